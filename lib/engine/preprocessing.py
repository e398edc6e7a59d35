"""Intensity handling and the slice <-> encoder-input geometry. Pure numpy/torch.

Volumes are (X, Y, Z) arrays as nibabel returns them; a slice z is shown to the model as the (Y, X) image
`volume[:, :, z].T`, so a voxel point [x, y, z] is the pixel (x, y) of slice z in SAM's xy convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

# Soft-tissue window (level, width) in HU; a common default for abdominal CT.
DEFAULT_CT_WINDOW = (40.0, 400.0)
MR_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityConfig:
    """How to map raw intensities to [0, 255].

    modality: "auto" (CT if the volume holds values below -500, as air in HU does), "CT" or "MR".
    ct_window: (level, width) in HU for CT.
    """

    modality: str = "auto"
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW

    @property
    def key(self) -> str:
        return f"{self.modality}:{self.ct_window[0]:g}/{self.ct_window[1]:g}"


def detect_modality(volume: np.ndarray) -> str:
    return "CT" if float(np.min(volume)) < -500 else "MR"


def intensity_bounds(volume: np.ndarray, config: IntensityConfig) -> tuple[str, float, float]:
    """(modality, low, high): CT uses the window; MR uses the 0.5-99.5 percentiles of non-background voxels."""
    modality = detect_modality(volume) if config.modality == "auto" else config.modality.upper()
    if modality == "CT":
        level, width = config.ct_window
        return modality, level - width / 2, level + width / 2
    sample = volume[volume > volume.min()]
    if sample.size == 0:
        return modality, float(volume.min()), float(volume.min()) + 1.0
    if sample.size > 2_000_000:  # percentiles of a strided sample are as good and 10x cheaper
        sample = sample[:: sample.size // 1_000_000]
    low, high = np.percentile(sample, MR_PERCENTILES)
    return modality, float(low), float(max(high, low + 1e-3))


def to_uint8(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to uint8 [0, 255] (1 byte a voxel keeps big volumes cheap to cache)."""
    scaled = (np.asarray(volume, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


class SliceGeometry:
    """Maps a (H, W) slice to the model's square input: resize the longest side to S, pad bottom/right."""

    def __init__(self, slice_shape: tuple[int, int], image_size: int) -> None:
        self.slice_shape = slice_shape
        self.image_size = image_size
        self._resize = ResizeLongestSide(image_size)
        self.resized_shape = ResizeLongestSide.get_preprocess_shape(slice_shape[0], slice_shape[1], image_size)

    def pixels(self, slices: np.ndarray) -> torch.Tensor:
        """(B, H, W) uint8 -> (B, 3, S, S) float in [0, 255], each slice min-max stretched (as MedSAM does)."""
        x = torch.from_numpy(np.ascontiguousarray(slices)).float().unsqueeze(1)
        x = F.interpolate(x, size=self.resized_shape, mode="bilinear", align_corners=False)
        flat = x.flatten(1)
        low = flat.min(dim=1).values.view(-1, 1, 1, 1)
        high = flat.max(dim=1).values.view(-1, 1, 1, 1)
        x = (x - low) / (high - low).clamp(min=1e-6) * 255.0
        pad_h = self.image_size - self.resized_shape[0]
        pad_w = self.image_size - self.resized_shape[1]
        return F.pad(x, (0, pad_w, 0, pad_h)).expand(-1, 3, -1, -1)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) slice pixel xy -> encoder-input xy (pixel centres)."""
        return self._resize.apply_coords(np.asarray(xy, dtype=np.float32) + 0.5, self.slice_shape)

    def box(self, box: np.ndarray) -> np.ndarray:
        """(4,) x0, y0, x1, y1 inclusive pixel bounds -> encoder-input box enclosing those pixels."""
        b = np.asarray(box, dtype=np.float32).copy()
        b[2:] += 1.0
        return self._resize.apply_boxes(b[None], self.slice_shape)[0]

    def low_res_to_slice(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B, M, 256, 256) low-res logits -> (B, M, H, W) logits on the slice grid."""
        size = self.image_size
        x = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
        x = x[..., : self.resized_shape[0], : self.resized_shape[1]]
        return F.interpolate(x, size=self.slice_shape, mode="bilinear", align_corners=False)

    def slice_to_low_res(self, mask: np.ndarray, low_res_size: tuple[int, int], scale: float = 8.0) -> torch.Tensor:
        """(H, W) binary mask -> (1, 1, 256, 256) logit-like mask prompt (+scale inside, -scale outside)."""
        x = torch.from_numpy(mask.astype(np.float32))[None, None]
        x = F.interpolate(x, size=self.resized_shape, mode="bilinear", align_corners=False)
        x = F.pad(x, (0, self.image_size - self.resized_shape[1], 0, self.image_size - self.resized_shape[0]))
        x = F.interpolate(x, size=low_res_size, mode="bilinear", align_corners=False)
        return (x * 2 - 1) * scale


# Window sides (pixels) a focus window snaps to, so nearby boxes share one cached embedding.
WINDOW_SIDES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class Window:
    """A square region of a slice, x0/y0 its top-left pixel (may lie outside the slice: padded with zeros)."""

    x0: int
    y0: int
    side: int

    @classmethod
    def around(cls, box: np.ndarray, slice_shape: tuple[int, int], context: float) -> Window | None:
        """A window `context` times the box's longest side, snapped to WINDOW_SIDES and a side/8 grid.

        Returns None when the window would not be smaller than the slice (then the full slice is used).
        """
        height, width = slice_shape
        extent = max(box[2] - box[0] + 1, box[3] - box[1] + 1) * context
        side = next((s for s in WINDOW_SIDES if s >= extent), WINDOW_SIDES[-1])
        if side >= max(height, width):
            return None
        step = max(1, side // 8)
        cx, cy = (box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2
        return cls(int(round((cx - side / 2) / step) * step), int(round((cy - side / 2) / step) * step), side)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """(H, W) -> (side, side), zero outside the slice."""
        out = np.zeros((self.side, self.side), dtype=image.dtype)
        ys, xs = self._overlap(image.shape)
        out[ys[1], xs[1]] = image[ys[0], xs[0]]
        return out

    def paste(self, mask: np.ndarray, slice_shape: tuple[int, int], fill: float = 0) -> np.ndarray:
        """(side, side) -> (H, W), `fill` (False for a mask) outside the window."""
        out = np.full(slice_shape, fill, dtype=mask.dtype)
        ys, xs = self._overlap(slice_shape)
        out[ys[0], xs[0]] = mask[ys[1], xs[1]]
        return out

    def _overlap(self, shape: tuple[int, ...]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        def axis(start: int, size: int) -> tuple[slice, slice]:
            low, high = max(0, start), min(size, start + self.side)
            return slice(low, max(low, high)), slice(low - start, max(low, high) - start)

        return axis(self.y0, shape[0]), axis(self.x0, shape[1])

    def to_window(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) slice xy -> window xy; boxes (x0, y0, x1, y1) work too."""
        offset = np.asarray([self.x0, self.y0] * (np.shape(xy)[-1] // 2))
        return np.asarray(xy) - offset
