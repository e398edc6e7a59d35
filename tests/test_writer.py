"""The fast label writer produces files that nibabel and pynrrd read back voxel- and geometry-exact."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from lib.infers.writer import RESULTS_PREFIX, remove_orphaned_results, write_label

REPO = Path(__file__).resolve().parents[1]

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


def _write_in_a_process(temp: Path, then: str = "") -> Path:
    """Write one label in a fresh interpreter whose temp folder is `temp`; `then`: code run after it."""
    code = (
        "import numpy as np, os, signal\n"
        "from lib.infers.writer import write_label\n"
        "print(write_label(np.ones((4, 3, 2), np.uint8), np.eye(4)), flush=True)\n" + then
    )
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return Path(done.stdout.strip())


def test_a_results_folder_goes_with_its_process_or_with_the_next_one(tmp_path):
    written = _write_in_a_process(tmp_path)
    assert written.parent.parent == tmp_path and written.parent.name.startswith(RESULTS_PREFIX)
    assert not written.parent.exists()  # removed at exit
    killed = _write_in_a_process(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.exists()  # a killed process runs no exit handler
    _write_in_a_process(tmp_path)
    assert not killed.parent.exists()  # the next process to make a results folder removed it
    assert list(tmp_path.iterdir()) == []


def test_only_folders_of_processes_that_are_gone_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / f"{RESULTS_PREFIX}abc-{gone.pid}"
    live = tmp_path / f"{RESULTS_PREFIX}xyz-{os.getpid()}"
    unnamed = tmp_path / f"{RESULTS_PREFIX}k2j4h5g6"  # no PID in its name: not ours to judge
    for folder in (orphan, live, unnamed):
        folder.mkdir()
        (folder / "label.nii.gz").write_bytes(b"x")
    assert remove_orphaned_results(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and unnamed.exists()
