"""The simulated annotator's protocol: where clicks go, how NoC is counted, and on which grid Dice is taken."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from conftest import load_truth
from lib.evaluation.annotator import (
    MAX_CLICKS,
    Click,
    GeometryMismatch,
    HttpSegmenter,
    clicks_to_reach,
    next_click,
    same_grid,
    session_2d,
    session_3d,
)
from lib.evaluation.ground_truth import middle_slice


def test_click_goes_to_the_centre_of_the_largest_missed_region():
    truth = np.zeros((30, 30), bool)
    truth[2:5, 2:5] = True  # small miss
    truth[10:21, 12:19] = True  # large miss: 11 x 7, centre (15, 15)
    click = next_click(np.zeros_like(truth), truth)
    assert click is not None and click.foreground
    assert click.point == (15, 15)


def test_background_click_when_the_largest_error_is_a_spill():
    truth = np.zeros((30, 30), bool)
    truth[5:10, 5:10] = True
    prediction = truth.copy()
    prediction[5:10, 5:7] = False  # 10 voxels missed
    prediction[20:29, 20:27] = True  # 63 voxels spilled, centre (24, 23)
    click = next_click(prediction, truth)
    assert click is not None and not click.foreground
    assert click.point == (24, 23)


def test_the_image_border_counts_as_the_region_boundary():
    truth = np.zeros((20, 20), bool)
    truth[0:5, 0:5] = True  # touches two image borders; unpadded, the distance peaks in the corner
    click = next_click(np.zeros_like(truth), truth)
    assert click is not None and click.point == (2, 2)


def test_3d_click_and_exact_prediction():
    truth = np.zeros((16, 16, 9), bool)
    truth[3:12, 4:9, 2:7] = True
    prediction = np.zeros_like(truth)
    prediction[3:12, 4:9, 2:4] = True  # the upper slices are missed: 9 x 5 x 3, centre (7, 6, 5)
    click = next_click(prediction, truth)
    assert click is not None and click.foreground and click.point == (7, 6, 5)
    assert next_click(truth, truth) is None
    with pytest.raises(ValueError, match="shape"):
        next_click(prediction[:, :, :5], truth)


def test_noc_counts_clicks_and_caps_at_twenty():
    dices = [0.5, 0.8, 0.86, 0.91]
    assert clicks_to_reach(dices, 0.85) == 3
    assert clicks_to_reach(dices, 0.90) == 4
    assert clicks_to_reach([0.2] * 5, 0.85) == MAX_CLICKS == 20
    assert clicks_to_reach([0.5] * 20 + [0.95], 0.90) == 20  # the 21st click does not count


def _square_segmenter(shape: tuple[int, int, int], radius: int):
    """Paints a square around each foreground click and erases one around each background click."""

    def segment(prompt: dict) -> np.ndarray:
        mask = np.zeros(shape, bool)
        z = prompt["slice"]
        for key, value in (("foreground", True), ("background", False)):
            for x, y, _ in prompt[key]:
                mask[max(0, x - radius) : x + radius + 1, max(0, y - radius) : y + radius + 1, z] = value
        return mask

    return segment


def test_2d_session_reaches_the_target_and_stops():
    truth = np.zeros((40, 40, 5), bool)
    truth[10:30, 10:19, 2] = True  # a 20 x 9 bar: its centre ridge runs along x, its middle is (19, 14)
    session = session_2d(_square_segmenter(truth.shape, radius=4), truth)
    assert session.clicks[0] == Click((19, 14), True)
    assert 1 < len(session.dices) < MAX_CLICKS
    assert session.dices[-1] >= 0.90 and all(d < 0.90 for d in session.dices[:-1])
    assert clicks_to_reach(session.dices, 0.90) == len(session.dices)


def test_2d_session_that_never_gets_there_costs_twenty_clicks():
    truth = np.zeros((40, 40, 5), bool)
    truth[5:35, 5:35, 2] = True

    def stubborn(prompt: dict) -> np.ndarray:  # a model that ignores the clicks
        mask = np.zeros(truth.shape, bool)
        mask[5:15, 5:15, prompt["slice"]] = True
        return mask

    session = session_2d(stubborn, truth)
    assert len(session.clicks) == len(session.dices) == MAX_CLICKS
    assert clicks_to_reach(session.dices, 0.85) == 20 and clicks_to_reach(session.dices, 0.90) == 20


def test_3d_session_sends_the_box_and_every_click_so_far():
    truth = np.zeros((24, 24, 10), bool)
    truth[4:20, 6:18, 2:8] = True
    sent: list[dict] = []

    def half(prompt: dict) -> np.ndarray:  # the box's lower half of slices only
        sent.append(prompt)
        mask = np.zeros(truth.shape, bool)
        mask[4:20, 6:18, 2:5] = True
        return mask

    session = session_3d(half, truth, clicks=3)
    assert len(session.dices) == 4 and len(sent) == 4
    assert sent[0]["roi"] == [4, 19, 6, 17, 2, 7] and sent[0]["foreground"] == []
    assert all(p["slice"] == middle_slice(truth) for p in sent)
    assert [len(p["foreground"]) for p in sent] == [0, 1, 2, 3]
    assert sent[1]["foreground"][0] == [11, 11, 6]  # centre of the missed slabs z=5..7
    assert session.dices[0] == pytest.approx(2 * 3 / (3 + 6))


def test_dice_is_taken_on_the_image_grid_only():
    reference = nib.Nifti1Image(np.zeros((8, 9, 10), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0]))
    same_grid(nib.Nifti1Image(np.zeros((8, 9, 10), np.uint8), reference.affine), reference)
    with pytest.raises(GeometryMismatch, match="shape"):
        same_grid(nib.Nifti1Image(np.zeros((9, 8, 10), np.uint8), reference.affine), reference)
    shifted = reference.affine.copy()
    shifted[0, 3] = 1.0
    with pytest.raises(GeometryMismatch, match="affine"):
        same_grid(nib.Nifti1Image(np.zeros((8, 9, 10), np.uint8), shifted), reference)


@pytest.mark.slow
def test_annotator_drives_the_real_server(server, sample_data, labels, tmp_path):
    """Both protocols over HTTP through MONAILabelClient on one structure of a sample study."""
    url, _, _ = server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    truth = load_truth(sample_data, "sub-01") == labels["left_thalamus"]
    reference = sample_data / "studies" / "sub-01.nii.gz"
    three_d = session_3d(HttpSegmenter(client, "foundation", "sub-01", reference), truth, clicks=2)
    assert len(three_d.dices) >= 2
    assert three_d.dices[0] > 0.5  # a box on a thalamus: the real model finds it
    assert three_d.final is not None and three_d.final.shape == truth.shape
    two_d = session_2d(HttpSegmenter(client, "foundation_2d", "sub-01", reference), truth, max_clicks=5)
    assert 1 <= len(two_d.dices) <= 5 and max(two_d.dices) > 0.5
    assert not list(tmp_path.glob("*.nii*"))  # each returned label is read, then removed
