"""2D segmentation of a prompted slice and 3D propagation through neighbouring slices.

Propagation (measured on the sample data, see README): each next slice is prompted by the previous slice's
mask box grown by a margin, the previous low-res logits as a mask prompt, and any clicks on that slice.
It stays within the roi's z-range and stops when the structure vanishes or jumps (a stopping rule), because
the naive "previous box only" scheme drifts into neighbours on thin or curved structures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from lib.engine.predictor import SlicePrediction, SlicePredictor
from lib.engine.prompts import Prompt
from lib.engine.volumes import PreparedVolume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PropagationConfig:
    """Knobs of the 3D propagation.

    margin: pixels added around the previous mask's box when prompting the next slice.
    use_mask_prompt: feed the previous low-res logits as a mask prompt.
    min_area: stop when a slice's mask has fewer pixels.
    max_growth: stop (outside an roi) when the area grows more than this factor from one slice to the next.
    min_iou: stop (outside an roi) when the decoder's predicted IoU falls below this.
    prefetch: slices encoded ahead in one batch.
    """

    margin: int = 3
    use_mask_prompt: bool = True
    min_area: int = 4
    max_growth: float = 2.5
    min_iou: float = 0.5
    prefetch: int = 4


@dataclass
class VolumeResult:
    """mask: (X, Y, Z) bool; affine: the image's voxel->RAS; slices: segmented slice indices; info: for the response."""

    mask: np.ndarray
    affine: np.ndarray
    slices: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def bounding_box(mask: np.ndarray) -> np.ndarray | None:
    """(4,) x0, y0, x1, y1 inclusive of a (H, W) mask, or None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.asarray([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


def _grow(box: np.ndarray, margin: int, width: int, height: int) -> np.ndarray:
    return np.asarray(
        [
            max(0, box[0] - margin),
            max(0, box[1] - margin),
            min(width - 1, box[2] + margin),
            min(height - 1, box[3] + margin),
        ],
        dtype=np.int64,
    )


def segment_slice(predictor: SlicePredictor, volume: PreparedVolume, prompt: Prompt, z: int) -> SlicePrediction:
    """Segment slice z from the roi's in-plane box and the clicks on that slice.

    With clicks and no box the one-click ambiguity is resolved by SAM's multimask output (best predicted IoU).
    """
    points, labels = prompt.points_on(z)
    box = prompt.box_2d()
    multimask = box is None and len(points) == 1
    return predictor.predict(volume, z, points, labels, box, multimask=multimask)


def segment_2d(predictor: SlicePredictor, volume: PreparedVolume, prompt: Prompt) -> VolumeResult:
    """Segment the prompted slice; the result is a full-size volume with only that slice set."""
    begin = time.perf_counter()
    z = prompt.start_slice()
    was_encoded = predictor.is_encoded(volume, z)
    prediction = segment_slice(predictor, volume, prompt, z)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[:, :, z] = prediction.mask.T
    info = {
        "slice": z,
        "iou": round(prediction.iou, 4),
        "cached_embedding": was_encoded,
        "seconds": round(time.perf_counter() - begin, 4),
    }
    return VolumeResult(mask, volume.affine, [z], info)


def propagate(
    predictor: SlicePredictor,
    volume: PreparedVolume,
    prompt: Prompt,
    config: PropagationConfig = PropagationConfig(),
) -> VolumeResult:
    """Segment the prompted slice, then walk up and down slice by slice within the roi (or until a stop)."""
    begin = time.perf_counter()
    encoded_before = predictor.encoded_slices
    width, height, depth = volume.shape
    z_low, z_high = prompt.z_range(depth)
    z0 = int(np.clip(prompt.start_slice(), z_low, z_high))
    first = segment_slice(predictor, volume, prompt, z0)
    mask = np.zeros(volume.shape, dtype=bool)
    done: list[int] = []
    stops: dict[str, str] = {}
    if first.mask.sum() >= config.min_area:
        mask[:, :, z0] = first.mask.T
        done.append(z0)
        for step, limit in ((1, z_high), (-1, z_low)):
            previous, z = first, z0 + step
            while (z <= limit) if step > 0 else (z >= limit):
                ahead = [z + step * i for i in range(config.prefetch) if z_low <= z + step * i <= z_high]
                predictor.encode(volume, ahead)
                box = bounding_box(previous.mask)
                assert box is not None
                points, labels = prompt.points_on(z)
                current = predictor.predict(
                    volume,
                    z,
                    points,
                    labels,
                    _grow(box, config.margin, width, height),
                    previous.low_res_logits if config.use_mask_prompt else None,
                )
                area, previous_area = int(current.mask.sum()), int(previous.mask.sum())
                reason = None
                if area < config.min_area:
                    reason = f"empty at z={z}"
                elif prompt.roi is None and area > config.max_growth * previous_area:
                    reason = f"area jumped at z={z}"
                elif prompt.roi is None and current.iou < config.min_iou:
                    reason = f"low predicted IoU at z={z}"
                if reason:
                    stops["up" if step > 0 else "down"] = reason
                    break
                mask[:, :, z] = current.mask.T
                done.append(z)
                previous, z = current, z + step
    seconds = time.perf_counter() - begin
    info = {
        "slice": z0,
        "slices": [min(done), max(done)] if done else [],
        "slices_segmented": len(done),
        "slices_encoded_now": predictor.encoded_slices - encoded_before,
        "stops": stops,
        "seconds": round(seconds, 3),
        "seconds_per_slice": round(seconds / max(1, len(done)), 3),
    }
    logger.info("3D propagation: %d slices from z=%d in %.2f s (%s)", len(done), z0, seconds, stops or "roi bounds")
    return VolumeResult(mask, volume.affine, sorted(done), info)
