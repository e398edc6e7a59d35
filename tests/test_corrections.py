"""Corrective clicks always correct: the mask agrees with every click after lib.engine.corrections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_truth
from lib.engine.cache import EmbeddingCache
from lib.engine.corrections import apply_clicks, voronoi_cut
from lib.engine.interactive import segment_2d
from lib.engine.predictor import SlicePrediction, SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.prompts import Prompt
from lib.engine.volumes import VolumeStore
from lib.evaluation.ground_truth import box_on_slice, middle_slice


def test_voronoi_cut_removes_what_is_nearer_the_background_click():
    mask = np.zeros((20, 40), bool)
    mask[5:15, 2:38] = True  # a bar along x
    out = voronoi_cut(mask, click=np.array([34, 10]), anchors=np.array([[6, 10]]))
    assert out[10, 6] and out[10, 19] and not out[10, 21] and not out[10, 34]
    assert not (out & ~mask).any(), "a cut never adds"


class _BlobDecoder:
    """Stands in for the decoder in the logic test only (the real model is tested below): every candidate
    box decodes to the square of side 7 around the first point."""

    def predict_batch(self, volume, z, points, labels, boxes):
        masks = []
        for _ in boxes:
            mask = np.zeros((30, 30), bool)
            x, y = points[0]
            mask[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4] = True
            masks.append(SlicePrediction(mask=mask, low_res_logits=torch.zeros(1, 1, 256, 256), iou=0.9))
        return masks


class _Volume:
    shape = (30, 30, 1)


def test_every_click_is_obeyed_and_agreeing_clicks_cost_nothing():
    base = np.zeros((30, 30), bool)
    base[5:15, 5:25] = True
    prediction = SlicePrediction(mask=base, low_res_logits=torch.zeros(1, 1, 256, 256), iou=0.8)
    points = np.array([[8, 8], [22, 10], [20, 24]])  # inside (agrees), inside (background), outside (foreground)
    labels = np.array([1, 0, 1])
    edited = apply_clicks(_BlobDecoder(), _Volume(), 0, prediction, points, labels)
    assert edited.mask[8, 8] and not edited.mask[10, 22] and edited.mask[24, 20]
    assert edited.mask[21:28, 17:24].all(), "the model's object under the foreground click is added"
    agreeing = apply_clicks(_BlobDecoder(), _Volume(), 0, prediction, points[:1], labels[:1])
    assert agreeing is prediction


@pytest.mark.slow
def test_real_model_masks_follow_clicks(lite_model, sample_data, labels):
    """LiteMedSAM with a box: a background click inside its mask and a foreground click on the structure
    outside it are both obeyed; without corrections the model keeps the spill."""
    predictor = SlicePredictor(lite_model, EmbeddingCache(256 << 20))
    volume = VolumeStore(IntensityConfig()).get(sample_data / "studies" / "sub-01.nii.gz")
    truth = load_truth(sample_data, "sub-01") == labels["left_thalamus"]
    z = middle_slice(truth)
    roi = box_on_slice(truth, z)
    box_only = segment_2d(predictor, volume, Prompt.from_request({"roi": roi}, volume.shape)).mask[:, :, z]
    spill = np.argwhere(box_only & ~truth[:, :, z])
    miss = np.argwhere(truth[:, :, z] & ~box_only)
    assert len(spill) and len(miss), "the box alone is not exact on this slice"
    background = [int(v) for v in spill[len(spill) // 2]] + [z]
    foreground = [int(v) for v in miss[len(miss) // 2]] + [z]
    request = {"roi": roi, "foreground": [foreground], "background": [background]}
    prompt = Prompt.from_request(request, volume.shape)
    corrected = segment_2d(predictor, volume, prompt).mask[:, :, z]
    assert corrected[foreground[0], foreground[1]] and not corrected[background[0], background[1]]
    plain = segment_2d(predictor, volume, prompt, corrections=False).mask[:, :, z]
    assert not (plain[foreground[0], foreground[1]] and not plain[background[0], background[1]])
