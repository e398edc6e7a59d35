"""The fast label writer produces files that nibabel and pynrrd read back voxel- and geometry-exact."""

import nibabel as nib
import nrrd
import numpy as np
import pytest

from lib.infers.writer import write_label

AFFINE = np.array([[-0.8, 0, 0.1, 90.0], [0, 0.8, 0, -126.0], [0.05, 0, 1.2, -72.0], [0, 0, 0, 1]])


@pytest.fixture
def label():
    rng = np.random.default_rng(0)
    return (rng.random((23, 17, 11)) > 0.7).astype(np.uint8) * 3


@pytest.mark.parametrize("extension", [".nii.gz", ".nii"])
def test_nifti_round_trip(label, extension):
    path = write_label(label, AFFINE, extension, compress=extension.endswith(".gz"))
    image = nib.load(path)
    np.testing.assert_array_equal(np.asarray(image.dataobj), label)
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-5)
    assert image.get_data_dtype() == np.uint8


@pytest.mark.parametrize("compress", [False, True])
def test_nrrd_round_trip(label, compress):
    path = write_label(label, AFFINE, ".nrrd", compress=compress, dtype="int16")
    data, header = nrrd.read(path)
    np.testing.assert_array_equal(data, label)
    assert data.dtype == np.int16
    np.testing.assert_allclose(header["space directions"], AFFINE[:3, :3].T, atol=1e-6)
    np.testing.assert_allclose(header["space origin"], AFFINE[:3, 3], atol=1e-6)
    assert header["space"] == "right-anterior-superior"


def test_unknown_format_or_dtype_is_refused(label):
    with pytest.raises(ValueError, match="not supported"):
        write_label(label, AFFINE, ".png")
    with pytest.raises(ValueError, match="not supported"):
        write_label(label, AFFINE, ".nii.gz", dtype="complex")
