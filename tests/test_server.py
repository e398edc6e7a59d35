"""A real MONAI Label server running the app, driven by `monailabel.client.MONAILabelClient`.

That client is the same code as the 3D Slicer module's `client.py`, so what passes here is what Slicer gets.
"""

import time

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import load_truth
from lib.evaluation.ground_truth import box_on_slice, centre_click, dice, middle_slice, roi_3d

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    # results downloaded into pytest's folder, not left in /tmp by every run
    return MONAILabelClient(server[0], tmpdir=str(tmp_path_factory.mktemp("client")), client_id="pytest")


def _image(studies, image_id):
    return nib.load(studies / f"{image_id}.nii.gz")


def _assert_same_geometry(result_file, image):
    result = nib.load(result_file)
    assert result.shape == image.shape
    np.testing.assert_allclose(result.affine, image.affine, atol=1e-5)
    return np.asarray(result.dataobj)


def test_info_lists_the_foundation_tasks(client, labels):
    info = client.info()
    assert info["name"] == "medfoundation"
    assert info["models"]["foundation"]["dimension"] == 3
    assert info["models"]["foundation_2d"]["dimension"] == 2
    assert info["models"]["foundation"]["type"] == info["models"]["foundation_2d"]["type"] == "deepgrow"
    assert info["models"]["foundation_auto"]["type"] == "segmentation"
    assert "foundation" in info["trainers"]
    assert info["labels"] == sorted(labels, key=labels.get), "names in index order, a list as OHIF's panel needs"
    assert info["models"]["foundation"]["labels"] == labels
    assert {"random", "first"} <= set(info["strategies"])


def test_2d_with_roi_and_with_points(client, server, sample_data, labels):
    studies = server[1]
    image = _image(studies, "sub-01")
    truth = load_truth(sample_data, "sub-01") == labels["right_putamen"]
    z = middle_slice(truth)
    result_file, params = client.infer("foundation_2d", "sub-01", {"roi": box_on_slice(truth, z), "label": "putamen"})
    mask = _assert_same_geometry(result_file, image)
    assert params["slice"] == z and params["label_names"] == {"putamen": 1}
    assert dice(mask[:, :, z], truth[:, :, z]) >= 0.75
    assert mask.sum() == mask[:, :, z].sum()

    click = centre_click(truth[:, :, z]) + [z]
    for _ in range(2):
        result_file, params = client.infer("foundation_2d", "sub-01", {"foreground": [click], "background": []})
    mask = _assert_same_geometry(result_file, image)
    assert params["cached_embedding"] is True  # second click on the slice: no second encoder run
    assert mask[click[0], click[1], z] == 1, "the clicked voxel is inside the mask"
    assert dice(mask[:, :, z], truth[:, :, z]) >= 0.5


def test_3d_with_roi_and_with_points(client, server, sample_data, labels):
    studies = server[1]
    image = _image(studies, "sub-02")
    truth = load_truth(sample_data, "sub-02") == labels["left_thalamus"]
    roi = roi_3d(truth)
    result_file, params = client.infer("foundation", "sub-02", {"roi": roi})
    mask = _assert_same_geometry(result_file, image)
    assert dice(mask, truth) >= 0.55
    zs = np.nonzero(mask.any(axis=(0, 1)))[0]
    assert roi[4] <= zs.min() and zs.max() <= roi[5]
    assert params["slices_segmented"] == len(zs)

    z = middle_slice(truth)
    result_file, params = client.infer("foundation", "sub-02", {"foreground": [centre_click(truth[:, :, z]) + [z]]})
    mask = _assert_same_geometry(result_file, image)
    assert mask[:, :, z].any() and params["slices_segmented"] >= 1


def test_result_formats_the_clients_ask_for(client, server, sample_data, labels):
    truth = load_truth(sample_data, "sub-01") == labels["left_caudate"]
    z = middle_slice(truth)
    params = {"roi": box_on_slice(truth, z), "result_extension": ".nrrd", "result_compress": False}
    result_file, _ = client.infer("foundation_2d", "sub-01", params)  # what OHIF asks for
    assert result_file.endswith(".nrrd")
    import nrrd

    data, header = nrrd.read(result_file)
    assert data.shape == _image(server[1], "sub-01").shape and data[:, :, z].any()
    np.testing.assert_allclose(header["space origin"], _image(server[1], "sub-01").affine[:3, 3], atol=1e-5)


@pytest.mark.parametrize(
    ("model", "image", "params", "status", "message"),
    [
        ("foundation_2d", "sub-01", {"foreground": [[500, 1, 1]]}, 400, "outside the image"),
        ("foundation_2d", "sub-01", {}, 400, "empty prompt"),
        ("foundation", "sub-01", {"roi": [1, 2, 3]}, 400, "'roi' must be"),
        ("foundation", "sub-01", {"roi": [0, 5, 0, 5, 0, 5], "result_extension": ".png"}, 400, "not supported"),
        ("foundation_2d", "no-such-image", {"foreground": [[1, 1, 1]]}, 404, "unknown image"),
        ("no_such_model", "sub-01", {"foreground": [[1, 1, 1]]}, 404, "unknown model"),
    ],
)
def test_bad_requests_get_a_4xx_that_names_the_problem(client, model, image, params, status, message):
    with pytest.raises(MONAILabelClientException) as error:
        client.infer(model, image, params)
    assert f"Status: {status};" in error.value.msg  # the client folds the HTTP status into its message
    assert message in error.value.msg


def test_unreadable_image_in_the_datastore_is_a_422(client, server):
    studies = server[1]
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    deadline = time.time() + 30  # the datastore notices new files by watching the folder
    while "broken" not in client.datastore().get("objects", {}) and time.time() < deadline:
        time.sleep(0.5)
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("foundation_2d", "broken", {"foreground": [[1, 1, 1]]})
    assert "Status: 422;" in error.value.msg and "cannot read image" in error.value.msg
    (studies / "broken.nii.gz").unlink()  # leave the datastore as the other tests expect it
    while "broken" in client.datastore().get("objects", {}) and time.time() < deadline + 30:
        time.sleep(0.5)


def test_next_sample_starts_pre_encoding(client, server):
    sample = client.next_sample("first", {})
    assert sample["id"] in ("sub-01", "sub-02")
    log, expected = server[2], f"pre-encoded 4 slices of {sample['path']}"
    deadline = time.time() + 60
    while expected not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert expected in log.read_text()
