"""The datastore keeps a team's labels: uploads are checked, written atomically, and never overwritten in place."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException

from lib.datastore.checks import UploadError, check_label_file, check_name, nifti_extension
from lib.datastore.local import SafeLocalDatastore

LABELS = {"liver": 1, "spleen": 2}
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
SHAPE = (24, 20, 6)
LIMIT = 50_000_000


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _label(values=(0, 1, 2)) -> np.ndarray:
    data = np.zeros(SHAPE, np.uint8)
    for i, value in enumerate(values):
        data[i * 4 : i * 4 + 4, 2:10, 1:4] = value
    return data


@pytest.fixture
def image(tmp_path) -> Path:
    return _save(tmp_path / "image.nii.gz", np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))


def _refused(label_path: Path, image: Path, status: int, text: str) -> None:
    with pytest.raises(UploadError) as error:
        check_label_file(label_path, image, set(LABELS.values()), LIMIT, LABELS)
    assert error.value.status == status
    assert text in str(error.value)


def test_a_good_label_is_summarised(tmp_path, image):
    summary = check_label_file(_save(tmp_path / "l.nii.gz", _label()), image, {1, 2}, LIMIT)
    assert summary.voxels == {1: 96, 2: 96}


def test_labels_of_another_grid_unknown_values_or_fractions_are_refused(tmp_path, image):
    _refused(_save(tmp_path / "a.nii.gz", np.zeros((24, 20, 5), np.uint8)), image, 422, "does not match the image's")
    shifted = AFFINE.copy()
    shifted[0, 3] = 4.0
    _refused(_save(tmp_path / "b.nii.gz", _label(), shifted), image, 422, "differ by up to 4 mm")
    _refused(_save(tmp_path / "c.nii.gz", _label((0, 1, 7))), image, 422, "label values [7] are not among")
    _refused(_save(tmp_path / "d.nii.gz", _label().astype(np.float32) * 0.5), image, 422, "non-integer")


def test_unreadable_truncated_and_wrong_type_uploads_are_refused(tmp_path, image):
    noisy = np.random.default_rng(1).integers(0, 3, SHAPE).astype(np.uint8)  # compresses little: the cut hits data
    whole = _save(tmp_path / "whole.nii.gz", noisy).read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) * 3 // 4])
    _refused(truncated, image, 422, "truncated or corrupt")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti file at all" * 20)
    _refused(garbage, image, 422, "not a readable NIfTI")
    with pytest.raises(UploadError, match="file type .png is not supported") as error:
        nifti_extension("label.png")
    assert error.value.status == 415


def test_a_gzip_bomb_is_refused_from_its_header_without_inflating_it(tmp_path, image):
    """1 GiB of zeros compressed to about 1 MB: refused (413) by its header, fast, with little memory."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.uint8)
    header.set_qform(AFFINE, 1)
    header.set_sform(AFFINE, 1)
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as out:
        out.write(header.binaryblock + b"\0" * 4)  # 348-byte header + 4-byte extension flag = vox_offset 352
        block = bytes(64 << 20)
        for _ in range(16):
            out.write(block)
    assert bomb.stat().st_size < 3 << 20
    begin = time.perf_counter()
    _refused(bomb, image, 413, "1074 million voxels")
    assert time.perf_counter() - begin < 5  # it did not inflate 1 GiB


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 200, "a..b", "tag\x00"])
def test_unsafe_ids_and_tags_are_refused(name):
    with pytest.raises(UploadError) as error:
        check_name("label tag", name)
    assert error.value.status == 400


@pytest.fixture
def store(tmp_path) -> SafeLocalDatastore:
    studies = tmp_path / "studies"
    studies.mkdir()
    _save(studies / "case-1.nii.gz", np.zeros(SHAPE, np.float32))
    return SafeLocalDatastore(str(studies), LABELS, LIMIT, extensions=["*.nii.gz", "*.nii"], auto_reload=False)


def test_a_saved_label_replaces_the_last_atomically_and_the_last_is_kept(store, tmp_path):
    first = _save(tmp_path / "first.nii.gz", _label((0, 1)))
    second = _save(tmp_path / "second.nii.gz", _label((0, 2)))
    store.save_label("case-1", str(first), "final", {"client_id": "ann-1"})
    store.save_label("case-1", str(second), "final", {"client_id": "ann-2"})
    current = Path(store.get_label_uri("case-1", "final"))
    assert current.read_bytes() == second.read_bytes()
    info = store.get_label_info("case-1", "final")
    assert info["client_id"] == "ann-2" and info["voxels"] == {"2": 96}
    kept = Path(store._datastore_path) / info["previous"]
    assert kept.read_bytes() == first.read_bytes()
    # the index was replaced, not rewritten in place, and no temporary file is left beside anything
    index = json.loads(Path(store._datastore_config_path).read_text())
    assert index["objects"]["case-1"]["labels"]["final"]["info"]["client_id"] == "ann-2"
    assert not [p for p in Path(store._datastore_path).rglob("*.tmp")]


def test_a_refused_label_leaves_nothing_behind_and_the_old_label_stands(store, tmp_path):
    good = _save(tmp_path / "good.nii.gz", _label((0, 1)))
    store.save_label("case-1", str(good), "final", {})
    before = sorted(p.relative_to(store._datastore_path) for p in Path(store._datastore_path).rglob("*"))
    bad = _save(tmp_path / "bad.nii.gz", _label((0, 9)))
    with pytest.raises(HTTPException) as error:
        store.save_label("case-1", str(bad), "final", {})
    assert error.value.status_code == 422 and "[9]" in error.value.detail
    with pytest.raises(HTTPException) as error:
        store.save_label("case-1", str(good), "../../outside", {})
    assert error.value.status_code == 400
    with pytest.raises(HTTPException) as error:
        store.save_label("no-such-case", str(good), "final", {})
    assert error.value.status_code == 404
    after = sorted(p.relative_to(store._datastore_path) for p in Path(store._datastore_path).rglob("*"))
    assert after == before
    assert not (tmp_path / "outside").exists()
    assert Path(store.get_label_uri("case-1", "final")).read_bytes() == good.read_bytes()


def test_images_are_checked_named_safely_and_removals_are_kept(store, tmp_path):
    upload = _save(tmp_path / "upload.nii.gz", np.random.default_rng(2).normal(size=SHAPE).astype(np.float32))
    assert store.add_image("case-2", str(upload), {}) == "case-2"
    with pytest.raises(HTTPException) as error:
        store.add_image("../../evil", str(upload), {})
    assert error.value.status_code == 400
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(upload.read_bytes()[:2000])
    with pytest.raises(HTTPException) as error:
        store.add_image("case-3", str(truncated), {})
    assert error.value.status_code == 422 and "case-3" not in store.list_images()
    store.save_label("case-2", str(_save(tmp_path / "l.nii.gz", _label((0, 1)))), "final", {})
    store.remove_image("case-2")
    history = Path(store._datastore_path) / ".history"
    assert len(list((history / "images" / "case-2").iterdir())) == 1
    assert len(list((history / "labels" / "final" / "case-2").iterdir())) == 1
    assert "case-2" not in store.list_images()


def test_a_torn_index_write_never_replaces_the_index(store, tmp_path, monkeypatch):
    """A crash while the index is written (simulated: the write fails half-way) leaves the last index whole."""
    good = _save(tmp_path / "good.nii.gz", _label((0, 1)))
    store.save_label("case-1", str(good), "final", {})
    index = Path(store._datastore_config_path).read_text()

    def torn(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lib.datastore.local.os.replace", torn)
    with pytest.raises(OSError):
        store._update_datastore_file()
    assert Path(store._datastore_config_path).read_text() == index
    assert json.loads(index)["objects"]["case-1"]["labels"]["final"]
    assert not list(Path(store._datastore_path).glob("*.tmp"))
