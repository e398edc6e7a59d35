"""Checks an uploaded image or label passes before it reaches the datastore (plain nibabel/numpy, no server).

Every failure is an `UploadError` whose `status` is the HTTP status a client should get and whose message
names the problem: 400 a bad id or tag, 413 a volume over the size limit, 415 a file type the datastore
cannot keep, 422 content that cannot be used (unreadable, truncated, wrong geometry, unknown label values).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

# what MONAI Label's local datastore lists (`*.nii.gz`, `*.nii`); a label in another format would be dropped
# from the datastore at its next refresh, so it is refused instead
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# ids and tags become file names: letters, digits, '.', '_', '-' only, and never '..' (no way out of the folder)
_SAFE_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# label and image voxel grids must agree to this many mm (float32 NIfTI headers round at ~1e-5 mm)
AFFINE_TOLERANCE_MM = 1e-3


class UploadError(ValueError):
    """An upload that cannot be stored; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UnreadableLabel(ValueError):
    """A stored label that cannot be read as a label map (it stays where it is; training leaves it out)."""


@dataclass(frozen=True)
class LabelSummary:
    """What a checked label holds: voxels per label value (background left out)."""

    voxels: dict[int, int]


def check_name(kind: str, value: str) -> str:
    """`value` if it is safe as a file name (an image id or a label tag); otherwise a 400 naming it."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise UploadError(
            400, f"{kind} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )
    return value


def nifti_extension(filename: str) -> str:
    """The NIfTI extension of `filename`; a 415 naming the accepted ones for anything else."""
    for extension in NIFTI_EXTENSIONS:
        if filename.endswith(extension):
            return extension
    suffix = "".join(Path(filename).suffixes) or "(none)"
    raise UploadError(415, f"file type {suffix} is not supported here; send {' or '.join(NIFTI_EXTENSIONS)}")


def _header(path: str | Path, what: str, max_voxels: int) -> nib.Nifti1Image:
    """The NIfTI image object after a header-only size check, so a gzip bomb is refused before it is inflated."""
    try:
        image = nib.load(str(path))
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for a file that is not NIfTI
        raise UploadError(422, f"{what} is not a readable NIfTI file: {error}") from error
    shape = tuple(int(n) for n in image.shape)
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if voxels > max_voxels:
        raise UploadError(
            413,
            f"{what} has {voxels / 1e6:.0f} million voxels (shape {shape}); the limit is {max_voxels / 1e6:.0f} "
            "million (--conf max_megavoxels)",
        )
    if voxels == 0:
        raise UploadError(422, f"{what} is empty (shape {shape})")
    return image


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A (X, Y, Z[, 1...]) shape without trailing singleton axes beyond the third."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _data(image: nib.Nifti1Image, what: str) -> np.ndarray:
    try:
        return np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as error:  # a truncated or corrupt data block
        raise UploadError(422, f"{what} is truncated or corrupt: {error}") from error


def check_image_file(path: str | Path, max_voxels: int) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of an uploaded image after reading it whole; an `UploadError` if it cannot be served."""
    image = _header(path, "the image", max_voxels)
    shape = _spatial(image.shape)
    if len(shape) not in (2, 3):
        raise UploadError(422, f"the image must be 2D or 3D, got shape {tuple(image.shape)}")
    _data(image, "the image")  # reads it whole: a truncated file is refused now, not at the first click
    return shape, np.asarray(image.affine, dtype=np.float64)


def check_label_file(
    label_path: str | Path,
    image_path: str | Path,
    label_values: set[int],
    max_voxels: int,
    label_names: dict[str, int] | None = None,
) -> LabelSummary:
    """Check a label against its image: readable, same voxel grid, only known label values.

    Args:
        label_path: the uploaded label (NIfTI).
        image_path: the image it labels (NIfTI; other formats skip the geometry check).
        label_values: the label values the app knows (background 0 is always allowed).
        max_voxels: refuse labels with more voxels than this before reading their data.
        label_names: {name: value}, only to name the known labels in the error message.
    """
    label = _header(label_path, "the label", max_voxels)
    label_shape = _spatial(label.shape)
    if str(image_path).endswith(NIFTI_EXTENSIONS):
        image = nib.load(str(image_path))
        image_shape = _spatial(image.shape)
        if label_shape != image_shape:
            raise UploadError(422, f"label shape {label_shape} does not match the image's shape {image_shape}")
        difference = float(np.abs(np.asarray(label.affine) - np.asarray(image.affine)).max())
        if difference > AFFINE_TOLERANCE_MM:
            raise UploadError(
                422,
                f"label geometry does not match the image: the voxel-to-world affines differ by up to "
                f"{difference:.4g} mm (label {np.round(label.affine, 3).tolist()}, "
                f"image {np.round(image.affine, 3).tolist()})",
            )
    data = _data(label, "the label")
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise UploadError(422, "the label holds NaN or infinite values")
        if not np.array_equal(data, np.round(data)):
            raise UploadError(422, "the label holds non-integer values; labels are integer label values")
    values, counts = np.unique(data, return_counts=True)
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in label_values)
    if unknown:
        known = label_names or {str(v): v for v in sorted(label_values)}
        raise UploadError(422, f"label values {unknown[:10]} are not among the known labels {known}")
    return LabelSummary({int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0})
