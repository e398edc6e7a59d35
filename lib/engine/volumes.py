"""Load an image once, normalise it to uint8 once, and keep the last few in memory."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.preprocessing import IntensityConfig, intensity_bounds, to_uint8

logger = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """The image file is missing, unreadable or not a 2D/3D image."""


class ImageTooLarge(ImageReadError):
    """The image has more voxels than the configured limit (its data is never read)."""


DEFAULT_MAX_VOXELS = 512_000_000


@dataclass
class PreparedVolume:
    """A volume ready for the model.

    Attributes:
        key: identifies file content + intensity handling (part of every embedding cache key).
        data: (X, Y, Z) uint8 intensities after windowing / percentile scaling.
        affine: (4, 4) voxel -> RAS world transform of the source image.
        modality: "CT" or "MR".
    """

    key: str
    data: np.ndarray
    affine: np.ndarray
    modality: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape  # type: ignore[return-value]

    def slice_image(self, z: int) -> np.ndarray:
        """(Y, X) uint8 view of slice z (rows = y, columns = x)."""
        return self.data[:, :, z].T

    def plane_view(self, plane: str) -> PreparedVolume:
        """The same voxels seen as sagittal ("sagittal": slice i is x = i, (Z, Y)) or coronal ("coronal": slice i is
        y = i, (Z, X)) slices, the last z on the first row (superior up in a RAS image, as models saw them in
        training). A view, not a copy; its own key, so its embeddings never mix with the axial ones."""
        return PreparedVolume(f"{self.key}:{plane}", to_plane_view(self.data, plane), self.affine, self.modality)


def to_plane_view(array: np.ndarray, plane: str) -> np.ndarray:
    """An (X, Y, Z) array laid out like `plane_view(plane).data` (a view, not a copy)."""
    order = {"sagittal": (1, 2, 0), "coronal": (0, 2, 1)}[plane]
    return array.transpose(order)[:, ::-1, :]


def from_plane_view(array: np.ndarray, plane: str) -> np.ndarray:
    """An array laid out like `plane_view(plane).data` (e.g. a mask segmented on its slices) back as (X, Y, Z)."""
    order = {"sagittal": (2, 0, 1), "coronal": (0, 2, 1)}[plane]  # the inverses of plane_view's transposes
    return array[:, ::-1, :].transpose(order)


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) float32 array and RAS affine, via nibabel for NIfTI and MONAI's ITK reader otherwise."""
    if path.endswith((".nii", ".nii.gz")):
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)
        affine = image.affine
    else:  # DICOM series folder, NRRD, ...
        from monai.transforms import LoadImage

        loaded = LoadImage(image_only=True, reader="ITKReader")(path)
        array = np.asarray(loaded, dtype=np.float32)
        affine = np.asarray(loaded.affine, dtype=np.float64)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageReadError(f"expected a 2D or 3D image, got shape {array.shape}")
    if not np.isfinite(array).all():
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    return array, np.asarray(affine, dtype=np.float64)


@functools.lru_cache(maxsize=4096)
def _content_digest(real_path: str, size: int, mtime_ns: int) -> str:
    """SHA-1 of a file's bytes, computed once per file version (the arguments): ~10 ms for a 5 MB MR, well
    under a second for a large CT, against ~1 s to encode one slice. A folder (a DICOM series) keeps its
    path-based identity."""
    if not os.path.isfile(real_path):
        return f"{real_path}|{size}|{mtime_ns}"
    with open(real_path, "rb") as file:
        return hashlib.file_digest(file, "sha1").hexdigest()


class VolumeStore:
    """LRU of prepared volumes keyed by file content and intensity settings: a copy of an image (another
    datastore, a re-import, a second server's studies) is the same volume, and its slices' embeddings are
    found again wherever they are kept.

    Args:
        capacity: at most this many volumes...
        max_bytes: ...and at most this many bytes of them (a prepared volume is uint8: 5 MB for a 161x197x161
            MR, 79 MB for a 512x512x300 CT), so that every annotator's volume stays in memory; with too few
            kept, 8 annotators on 8 images made every click read and normalise its volume again (1.4 s).
        max_voxels: images with more voxels are refused before their data is read.
    """

    def __init__(
        self,
        intensity: IntensityConfig,
        capacity: int = 4,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        max_bytes: int | None = None,
    ) -> None:
        self.intensity = intensity
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.max_voxels = max_voxels
        self._items: OrderedDict[str, PreparedVolume] = OrderedDict()
        self._lock = threading.Lock()

    def _identity(self, path: str) -> str:
        stat = os.stat(path)
        digest = _content_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        return hashlib.sha1(f"{digest}|{self.intensity.key}".encode()).hexdigest()[:16]

    def _check_size(self, path: str) -> None:
        try:
            shape = nib.load(path).shape
        except Exception as error:  # noqa: BLE001 - nibabel raises many types for a file that is not NIfTI
            raise ImageReadError(f"cannot read image {os.path.basename(path)}: {error}") from error
        voxels = int(np.prod(shape, dtype=np.int64))
        if voxels > self.max_voxels:
            raise ImageTooLarge(
                f"image {os.path.basename(path)} has {voxels / 1e6:.0f} million voxels (shape {tuple(shape)}); this "
                f"server's limit is {self.max_voxels / 1e6:.0f} million (--conf max_megavoxels)"
            )

    def get(self, path: str | Path) -> PreparedVolume:
        path = str(path)
        if not path or not os.path.exists(path):
            raise ImageReadError(f"image not found: {path or '(empty)'}")
        key = self._identity(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        if path.endswith((".nii", ".nii.gz")):  # the header says how big it is before anything is inflated
            self._check_size(path)
        try:
            array, affine = _read(path)
        except ImageReadError:
            raise
        except Exception as error:  # noqa: BLE001 - readers raise many types for a corrupt file
            raise ImageReadError(f"cannot read image {os.path.basename(path)}: {error}") from error
        modality, low, high = intensity_bounds(array, self.intensity)
        volume = PreparedVolume(key, to_uint8(array, low, high), affine, modality)
        logger.info(
            "prepared %s: shape %s, %s, range [%.1f, %.1f]", os.path.basename(path), array.shape, modality, low, high
        )
        with self._lock:
            self._items[key] = volume
            while len(self._items) > 1 and (
                len(self._items) > self.capacity
                or (self.max_bytes is not None and sum(v.data.nbytes for v in self._items.values()) > self.max_bytes)
            ):
                self._items.popitem(last=False)
        return volume
