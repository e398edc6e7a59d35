"""Write a label volume fast, in the format the client asked for (OHIF asks for raw NRRD, Slicer takes NIfTI)."""

from __future__ import annotations

import os
import tempfile

import nibabel as nib
import nrrd
import numpy as np

SUPPORTED = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
# Results live in a folder of their own: MONAI Label's client saves a result as <its tmpdir>/<file name>, which
# is the system temp folder by default, so a result written there by a server on the same workstation would be
# the very file the server's clean-up task deletes once the response is sent.
_RESULTS_DIR: str | None = None


def results_dir() -> str:
    global _RESULTS_DIR
    if _RESULTS_DIR is None or not os.path.isdir(_RESULTS_DIR):
        _RESULTS_DIR = tempfile.mkdtemp(prefix="medfoundation-results-")
    return _RESULTS_DIR


DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}


def write_label(
    label: np.ndarray, affine: np.ndarray, extension: str = ".nii.gz", compress: bool = True, dtype: str = "uint8"
) -> str:
    """Write (X, Y, Z) `label` with the image's `affine` to a new temporary file and return its path.

    NIfTI is gzipped at level 1 (nibabel's default: a mostly-empty label compresses well at a fraction of the
    cost of level 6); NRRD is written in RAS space with the same geometry.
    """
    if extension not in SUPPORTED:
        raise ValueError(f"result_extension {extension!r} is not supported; use one of {', '.join(SUPPORTED)}")
    if dtype not in DTYPES:
        raise ValueError(f"result_dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if extension == ".nii" and compress:
        extension = ".nii.gz"
    data = label.astype(DTYPES[dtype], copy=False)
    fd, path = tempfile.mkstemp(suffix=extension, prefix="label-", dir=results_dir())
    os.close(fd)
    if extension.endswith(".nrrd"):
        header = {
            "space": "right-anterior-superior",
            "space directions": affine[:3, :3].T,
            "space origin": affine[:3, 3],
            "encoding": "gzip" if compress else "raw",
        }
        nrrd.write(path, data, header, compression_level=1)
    else:
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, path)
    return path
