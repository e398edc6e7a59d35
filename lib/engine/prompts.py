"""Prompts as MONAI Label clients send them, validated: OHIF and Slicer send voxel points and an roi.

`foreground` / `background`: lists of [x, y, z] voxel indices; `roi`: [x0, x1, y0, y1, z0, z1] voxel bounds
(either order in each pair, as Slicer's RAS->IJK conversion may flip them); `slice`: the slice a 2D
request is about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


class PromptError(ValueError):
    """The prompt is malformed or outside the image; the message names the problem."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptError(f"{what}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise PromptError(f"{what}: not a finite number ({value!r})")
    return float(value)


def _points(value: Any, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    if value is None:
        return np.zeros((0, 3), dtype=np.int64)
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"'{name}' must be a list of [x, y, z] points, got {type(value).__name__}")
    points = []
    for i, point in enumerate(value):
        if not isinstance(point, (list, tuple)) or len(point) != 3:
            raise PromptError(f"'{name}'[{i}] must be [x, y, z], got {point!r}")
        xyz = [round(_number(c, f"'{name}'[{i}]")) for c in point]
        if any(c < 0 or c >= n for c, n in zip(xyz, shape, strict=False)):
            raise PromptError(f"'{name}'[{i}] = {list(point)} is outside the image of size {list(shape)} (x, y, z)")
        points.append(xyz)
    return np.asarray(points, dtype=np.int64).reshape(-1, 3)


def _roi(value: Any, shape: tuple[int, int, int]) -> np.ndarray | None:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise PromptError(f"'roi' must be [x0, x1, y0, y1, z0, z1], got {value!r}")
    raw = [_number(c, "'roi'") for c in value]
    bounds = []
    for axis in range(3):
        low, high = sorted(raw[2 * axis : 2 * axis + 2])
        low, high = max(0, round(low)), min(shape[axis] - 1, round(high))
        if low > high:
            raise PromptError(f"'roi' = {list(value)} does not overlap the image of size {list(shape)} (x, y, z)")
        bounds += [low, high]
    return np.asarray(bounds, dtype=np.int64)


@dataclass(frozen=True)
class Prompt:
    """Validated prompt in voxel indices; roi bounds are inclusive and sorted."""

    foreground: np.ndarray  # (N, 3) x, y, z
    background: np.ndarray  # (M, 3) x, y, z
    roi: np.ndarray | None  # (6,) x0, x1, y0, y1, z0, z1
    slice_index: int | None

    @classmethod
    def from_request(cls, request: dict[str, Any], shape: tuple[int, int, int]) -> Prompt:
        foreground = _points(request.get("foreground"), "foreground", shape)
        background = _points(request.get("background"), "background", shape)
        roi = _roi(request.get("roi"), shape)
        slice_index = request.get("slice")
        if slice_index is not None:
            z = _number(slice_index, "'slice'")
            slice_index = None if z < 0 else round(z)  # OHIF sends -1 for "no slice"
            if slice_index is not None and slice_index >= shape[2]:
                raise PromptError(f"'slice' = {slice_index} is outside the image's {shape[2]} slices")
        if len(foreground) == 0 and roi is None:
            raise PromptError("empty prompt: give at least one 'foreground' point [x, y, z] or an 'roi'")
        return cls(foreground, background, roi, slice_index)

    def start_slice(self) -> int:
        """The slice to segment first: `slice`, else the latest foreground point's, else the roi's middle."""
        if self.slice_index is not None:
            return self.slice_index
        if len(self.foreground):
            return int(self.foreground[-1, 2])
        assert self.roi is not None
        return int((self.roi[4] + self.roi[5]) // 2)

    def points_on(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, 2) xy and (K,) labels (1 foreground, 0 background) of the points on slice z."""
        fg = self.foreground[self.foreground[:, 2] == z, :2]
        bg = self.background[self.background[:, 2] == z, :2]
        labels = np.concatenate([np.ones(len(fg)), np.zeros(len(bg))]).astype(np.int64)
        return np.concatenate([fg, bg]).reshape(-1, 2), labels

    def box_2d(self) -> np.ndarray | None:
        """(4,) x0, y0, x1, y1 in-plane roi bounds, or None."""
        if self.roi is None:
            return None
        return np.asarray([self.roi[0], self.roi[2], self.roi[1], self.roi[3]], dtype=np.int64)

    def z_range(self, depth: int) -> tuple[int, int]:
        """Inclusive slice range to propagate over: the roi's, else the whole volume (a stopping rule ends it)."""
        if self.roi is None:
            return 0, depth - 1
        return int(self.roi[4]), int(self.roi[5])
