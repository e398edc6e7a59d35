"""Prompt-free segmentation of a whole volume with a trained version's automatic head.

Coarse to fine, so a volume costs the slices that matter: every `coarse_step`-th slice is segmented first,
then every slice between the first and last slice of each label's largest part in that coarse stack (plus a
margin). Each label keeps its largest 3D connected part, which removes stray islands a slice-wise head can leave.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from lib.engine.embedding_store import low_res_pixels
from lib.engine.interactive import VolumeResult
from lib.engine.predictor import SlicePredictor
from lib.engine.volumes import PreparedVolume
from lib.model.auto_head import AutoHead

logger = logging.getLogger(__name__)


class NothingLearnedError(RuntimeError):
    """The served model has no automatic head yet: no training round has been published."""


@dataclass(frozen=True)
class AutoConfig:
    coarse_step: int = 4  # first pass: every n-th slice
    margin: int = 2  # slices beyond the labelled range found by the first pass
    batch: int = 8  # slices per head call


@torch.no_grad()
def _segment_slices(
    predictor: SlicePredictor, head: AutoHead, volume: PreparedVolume, slices: list[int], batch: int
) -> dict[int, np.ndarray]:
    """{z: (H, W) uint8 channel map} for the given slices (channel 0 background, i = head.names[i - 1])."""
    geometry = predictor.geometry(volume)
    network = predictor.network
    low_res = network.mask_input_size[0]
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(slices), batch):
        chunk = slices[start : start + batch]
        predictor.encode(volume, chunk)
        embeddings = torch.cat([predictor.embedding(volume, z) for z in chunk])
        pixels = low_res_pixels(geometry.pixels(np.stack([volume.slice_image(z) for z in chunk])), low_res)
        logits = head(embeddings, network.dense_pe(), pixels.to(embeddings.device).float().unsqueeze(1) / 255.0)
        channels = geometry.low_res_to_slice(logits.float()).argmax(dim=1).to(torch.uint8).cpu().numpy()
        out.update(zip(chunk, channels, strict=True))
    return out


def largest_parts(labels: np.ndarray, count: int) -> np.ndarray:
    """Keep, for each channel 1..count, only its largest 3D connected component."""
    cleaned = np.zeros_like(labels)
    for channel in range(1, count + 1):
        mask = labels == channel
        if not mask.any():
            continue
        parts, found = ndimage.label(mask)
        if found > 1:
            sizes = ndimage.sum_labels(mask, parts, index=np.arange(1, found + 1))
            mask = parts == int(np.argmax(sizes)) + 1
        cleaned[mask] = channel
    return cleaned


def fine_slices(coarse: dict[int, np.ndarray], depth: int, count: int, config: AutoConfig) -> list[int]:
    """The slices the fine pass segments, given the coarse pass's {z: (H, W) channel map}.

    They span each label's largest part in the coarse stack, a coarse step and the margin beyond its first and
    last slice. Stray specks near the volume's ends, which the final clean-up drops anyway, would otherwise
    stretch the fine pass over every slice. Coarse slices are not segmented again.
    """
    zs = sorted(coarse)
    kept = largest_parts(np.stack([coarse[z] for z in zs]), count)
    found = [z for z, channel_map in zip(zs, kept, strict=True) if channel_map.any()]
    if not found:
        return []
    low = max(0, found[0] - config.coarse_step - config.margin)
    high = min(depth - 1, found[-1] + config.coarse_step + config.margin)
    return [z for z in range(low, high + 1) if z not in coarse]


def auto_segment(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    label_values: dict[str, int],
    config: AutoConfig = AutoConfig(),
) -> VolumeResult:
    """Segment every learned label of the volume; the mask holds each label's value from `label_values`.

    Raises:
        NothingLearnedError: the served model has not learned any label yet.
    """
    model = predictor.model
    head = model.auto_head
    if head is None:
        raise NothingLearnedError(
            "no label has been learned yet: submit final labels and train (POST /train/foundation) first"
        )
    begin = time.perf_counter()
    encoded_before = predictor.encoded_slices
    depth = volume.shape[2]
    coarse = list(range(config.coarse_step // 2, depth, config.coarse_step))
    channels = _segment_slices(predictor, head, volume, coarse, config.batch)
    rest = fine_slices(channels, depth, len(head.names), config)
    channels.update(_segment_slices(predictor, head, volume, rest, config.batch))
    stack = np.zeros((depth, *volume.slice_image(0).shape), np.uint8)  # (Z, Y, X)
    for z, channel_map in channels.items():
        stack[z] = channel_map
    stack = largest_parts(stack, len(head.names))
    lookup = np.zeros(len(head.names) + 1, np.uint8)
    learned = {}
    for channel, name in enumerate(head.names, start=1):
        if name in label_values:
            lookup[channel] = label_values[name]
            learned[name] = label_values[name]
    mask = np.asfortranarray(lookup[stack].transpose(2, 1, 0))  # (X, Y, Z), F order for the writer
    seconds = time.perf_counter() - begin
    present = sorted(n for n, v in learned.items() if (mask == v).any())
    info = {
        "labels_found": present,
        "label_names": learned,
        "slices_segmented": len(channels),
        "slices_encoded_now": predictor.encoded_slices - encoded_before,
        "seconds": round(seconds, 2),
    }
    logger.info("automatic segmentation: %d labels on %d slices in %.1f s", len(present), len(channels), seconds)
    return VolumeResult(mask, volume.affine, sorted(channels), info)
