"""Write a label volume fast, in the format the client asked for (OHIF asks for raw NRRD, Slicer takes NIfTI).

nibabel and pynrrd take ~30 ms for a 161x197x161 label even uncompressed (measured); a click must answer in
tens of milliseconds, so the header comes from nibabel (NIfTI) or a few lines of text (NRRD) and the voxels
are written in one piece, gzip level 1 when compression is asked for: 4-10 ms.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.atomic import remove_stale_temporaries, scratch_dir

SUPPORTED = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}
_NRRD_TYPES = {np.uint8: "uint8", np.uint16: "uint16", np.int16: "int16", np.int32: "int32", np.float32: "float"}

# Results live in a folder of their own: MONAI Label's client saves a result as <its tmpdir>/<file name>, which
# is the system temp folder by default, so a result written there by a server on the same workstation would be
# the very file the server's clean-up task deletes once the response is sent.
RESULTS_PREFIX = ".tmp-medfoundation-results-"
_RESULTS_DIR: str | None = None


def results_dir() -> str:
    """This process's results folder, `<temp>/.tmp-medfoundation-results-<random>-<pid>`, removed when it exits.

    A server that is killed (or stopped by a signal that skips exit handlers) cannot remove its own; its name is a
    temporary's with the writer's PID (lib.atomic), so each new folder's maker first removes those of processes
    that are gone (`remove_orphaned_results`).
    """
    global _RESULTS_DIR
    if _RESULTS_DIR is None or not os.path.isdir(_RESULTS_DIR):
        remove_orphaned_results()
        _RESULTS_DIR = str(scratch_dir(RESULTS_PREFIX, suffix=f"-{os.getpid()}"))
    return _RESULTS_DIR


def remove_orphaned_results(parent: str | Path | None = None) -> list[Path]:
    """Remove the results folders in `parent` (default: the system temp folder) whose process is gone and that
    this user owns; return them. Another user's folders, and a live server's, are left alone."""
    found = Path(parent or tempfile.gettempdir()).glob(f"{RESULTS_PREFIX}*")
    return remove_stale_temporaries(folder for folder in found if _owned(folder))


def _owned(path: Path) -> bool:
    getuid = getattr(os, "getuid", None)  # POSIX only; elsewhere the temp folder is the user's own
    try:
        return getuid is None or path.stat().st_uid == getuid()
    except OSError:
        return False


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A single-file NIfTI-1 image: nibabel's header, no extensions, voxels in Fortran order."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    header["vox_offset"] = 352
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    return header.binaryblock + b"\x00\x00\x00\x00" + data.tobytes(order="F")


def nrrd_bytes(data: np.ndarray, affine: np.ndarray, compress: bool) -> bytes:
    """A detached-header-free NRRD in RAS space with the image's geometry, voxels in Fortran order."""

    def vector(values) -> str:
        return "(" + ",".join(f"{float(v):.10g}" for v in values) + ")"

    directions = " ".join(vector(affine[:3, axis]) for axis in range(3))
    header = (
        "NRRD0004\n"
        f"type: {_NRRD_TYPES[data.dtype.type]}\n"
        "dimension: 3\n"
        "space: right-anterior-superior\n"
        f"sizes: {' '.join(str(s) for s in data.shape)}\n"
        f"space directions: {directions}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        f"encoding: {'gzip' if compress else 'raw'}\n"
        f"space origin: {vector(affine[:3, 3])}\n\n"
    ).encode()
    voxels = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes(order="F")
    return header + (gzip.compress(voxels, compresslevel=1) if compress else voxels)


def write_label(
    label: np.ndarray, affine: np.ndarray, extension: str = ".nii.gz", compress: bool = True, dtype: str = "uint8"
) -> str:
    """Write (X, Y, Z) `label` with the image's `affine` to a new file in the results folder; return its path."""
    if extension not in SUPPORTED:
        raise ValueError(f"result_extension {extension!r} is not supported; use one of {', '.join(SUPPORTED)}")
    if dtype not in DTYPES:
        raise ValueError(f"result_dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if extension == ".nii" and compress:
        extension = ".nii.gz"
    data = label.astype(DTYPES[dtype], copy=False)
    if extension.endswith(".nrrd"):
        payload = nrrd_bytes(data, affine, compress)
    else:
        payload = nifti_bytes(data, affine)
        if extension == ".nii.gz":
            payload = gzip.compress(payload, compresslevel=1)
    fd, path = tempfile.mkstemp(suffix=extension, prefix="label-", dir=results_dir())
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
    return path
