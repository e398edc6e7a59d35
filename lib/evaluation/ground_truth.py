"""Prompts a careful annotator would give, derived from a ground-truth mask, and the overlap measures."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary arrays; 1.0 when both are empty."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(prediction, truth).sum() / total)


def middle_slice(truth: np.ndarray) -> int:
    """The slice (z) in the middle of the structure's z-extent that holds the most of it nearby."""
    zs = np.nonzero(truth.any(axis=(0, 1)))[0]
    return int(zs[len(zs) // 2])


def box_on_slice(truth: np.ndarray, z: int) -> list[int]:
    """roi [x0, x1, y0, y1, z, z] of the structure's tight box on slice z (a 2D box prompt)."""
    xs, ys = np.nonzero(truth[:, :, z])
    return [int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max()), z, z]


def roi_3d(truth: np.ndarray) -> list[int]:
    """roi of the CVPR 2025 interactive challenge's 3D box: the tight 2D box on the middle slice + the z-extent."""
    z = middle_slice(truth)
    zs = np.nonzero(truth.any(axis=(0, 1)))[0]
    x0, x1, y0, y1, _, _ = box_on_slice(truth, z)
    return [x0, x1, y0, y1, int(zs.min()), int(zs.max())]


def centre_click(truth_2d: np.ndarray) -> list[int]:
    """The (x, y) of the structure's most interior pixel (maximum of the distance transform)."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(truth_2d)
    x, y = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [int(x), int(y)]
