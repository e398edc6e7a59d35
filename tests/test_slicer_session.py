"""A whole annotation session with the 3D Slicer module's client code, against a real server.

3D Slicer itself (Qt, VTK, MRML) cannot run here, so `SlicerModule` below repeats what the module's
`MONAILabelLogic` and `onClickDeepgrow` / `onSaveLabel` / `onTraining` / `onNextSampleButton` do (monailabel
0.8.5, plugins/slicer/MONAILabel/MONAILabel.py): the same `MONAILabelClient` calls with the same parameters,
points and the ROI converted from RAS to voxel indices with the volume's RAS-to-IJK matrix and rounded, the
result asked as `.nrrd` / `uint8`. What is not Slicer is only the scene: the points a user would place are
taken from the ground truth.
"""

from __future__ import annotations

import time

import nibabel as nib
import nrrd
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import QUIET_ENV, load_truth, quiet_server_conf, server_folders
from lib.evaluation.ground_truth import box_on_slice, centre_click, dice, middle_slice, roi_3d
from lib.evaluation.server import ServerProcess

pytestmark = pytest.mark.slow


class SlicerModule:
    """The MONAI Label Slicer module's calls, without Slicer (see the module docstring)."""

    def __init__(self, server_url: str, tmpdir: str, client_id: str = "user-xyz") -> None:
        self.server_url, self.tmpdir, self.client_id = server_url, tmpdir, client_id
        self.models: dict = {}
        self.current_sample: dict = {}
        self.ras_to_ijk = np.eye(4)

    def _client(self) -> MONAILabelClient:  # MONAILabelLogic._client, auth off
        return MONAILabelClient(self.server_url, self.tmpdir, self.client_id)

    def fetch_info(self) -> dict:
        info = self._client().info()
        self.models = info["models"]
        return info

    def next_sample(self, strategy: str) -> dict:  # onNextSampleButton
        self.current_sample = self._client().next_sample(strategy, {})
        image = nib.load(self.current_sample["path"])  # Slicer loads the volume the sample points at
        self.ras_to_ijk = np.linalg.inv(image.affine)
        return self.current_sample

    def to_ijk(self, ras: np.ndarray) -> list[int]:  # getControlPointsXYZ: RAS -> IJK, rounded
        return [round(v) for v in (self.ras_to_ijk @ np.append(ras, 1.0))[:3]]

    def roi_ijk(self, ras_min: np.ndarray, ras_max: np.ndarray) -> list[int]:  # getROIPointsXYZ
        low, high = self.to_ijk(ras_min), self.to_ijk(ras_max)
        return [v for pair in zip(low, high, strict=True) for v in pair]

    def click(self, model: str, label: str, foreground: list, background: list, roi: list | None = None):
        """onClickDeepgrow with the current point being the last foreground click."""
        is_3d = self.models[model].get("dimension", 3) != 2
        current_point = foreground[-1] if foreground else background[-1]
        slice_index = current_point[2]
        if is_3d or not slice_index:
            params = {"label": label, "foreground": foreground, "background": background}
        else:
            params = {
                "label": label,
                "foreground": [p for p in foreground if p[2] == slice_index],
                "background": [p for p in background if p[2] == slice_index],
            }
        if roi:
            params["roi"] = roi
        if not is_3d:
            params["slice"] = slice_index
        params["result_extension"] = ".nrrd"  # MONAILabelLogic.infer
        params["result_dtype"] = "uint8"
        result_file, result = self._client().infer(model, self.current_sample["id"], params, None, None, None)
        data, _ = nrrd.read(result_file)
        return data, result

    def save_label(self, label_file: str, label_info: list[dict]) -> dict:  # onSaveLabel
        return self._client().save_label(self.current_sample["id"], label_file, params={"label_info": label_info})

    def train(self, model: str, params: dict) -> dict:  # onTraining
        return self._client().train_start(model, params)


@pytest.fixture(scope="module")
def slicer_server(sample_data, tmp_path_factory):
    studies, log = server_folders(sample_data, tmp_path_factory, "-slicer")
    model_dir = tmp_path_factory.mktemp("model-slicer")
    conf = quiet_server_conf(sample_data, model_dir, train_slice_step="6", lease_minutes="30")
    with ServerProcess(studies, log, conf, env=QUIET_ENV) as process:
        yield process


def _served_version(module: SlicerModule) -> int:
    return module.fetch_info()["train_stats"]["foundation"]["served_version"]


def test_a_whole_annotation_session_as_the_slicer_module_runs_it(slicer_server, sample_data, labels, tmp_path):
    module = SlicerModule(slicer_server.url, str(tmp_path))
    info = module.fetch_info()
    assert module.models["foundation_2d"]["dimension"] == 2 and module.models["foundation"]["dimension"] == 3
    assert {"first", "random", "uncertain"} <= set(info["strategies"])
    affine = nib.load(sample_data / "studies" / "sub-01.nii.gz").affine
    labelled = []
    for _ in range(2):
        sample = module.next_sample("first")
        image_id = sample["id"]
        assert image_id not in labelled, "a labelled image is not handed out again"
        truth_all = load_truth(sample_data, image_id)
        truth = truth_all == labels["left_thalamus"]
        z = middle_slice(truth)

        # the user places a foreground point on the thalamus (in RAS, as Slicer stores it)
        x, y = centre_click(truth[:, :, z])
        point = module.to_ijk((affine @ np.array([x, y, z, 1.0]))[:3])
        assert point == [x, y, z], "RAS -> IJK round trip of the module"
        mask, result = module.click("foundation_2d", "left_thalamus", [point], [])
        assert mask.shape == truth.shape and mask.dtype == np.uint8
        assert mask[:, :, z].sum() == mask.sum(), "2D fills only the clicked slice"
        assert dice(mask[:, :, z] > 0, truth[:, :, z]) > 0.5
        assert result["label_names"] == {"left_thalamus": 1}

        # a background point where the mask spills over, as a user would correct it
        spill = np.argwhere((mask[:, :, z] > 0) & ~truth[:, :, z])
        if len(spill):
            background = [int(spill[len(spill) // 2][0]), int(spill[len(spill) // 2][1]), z]
            corrected, _ = module.click("foundation_2d", "left_thalamus", [point], [background])
            assert not corrected[background[0], background[1], z], "the background click is obeyed"

        # 3D from an ROI drawn around the structure (RAS corners, as the ROI node gives them)
        x0, x1, y0, y1, z0, z1 = roi_3d(truth)
        corners = [affine @ np.array([x0, y0, z0, 1.0]), affine @ np.array([x1, y1, z1, 1.0])]
        roi = module.roi_ijk(corners[0][:3], corners[1][:3])
        box = box_on_slice(truth, z)
        assert roi[:4] == box[:4]
        volume, result = module.click("foundation", "left_thalamus", [point], [], roi)
        assert result["slices_segmented"] > 5
        assert dice(volume > 0, truth) > 0.5

        # the user corrects it into the final label (here: the ground truth) and saves it
        label_file = tmp_path / f"{image_id}-final.nii.gz"
        nib.save(nib.Nifti1Image(truth_all.astype(np.uint8), affine), label_file)
        label_info = [{"name": name, "idx": index} for name, index in labels.items()]
        saved = module.save_label(str(label_file), label_info)
        assert saved["image"] == image_id
        labelled.append(image_id)

    # Train: the module sends the trainer's config params; a short round here (its gate may or may not publish
    # it: what counts is that the module's request trained a version on the labels it saved)
    assert _served_version(module) == 0
    module.train("foundation", {"steps": 10})
    deadline = time.time() + 900
    while len(module.fetch_info()["train_stats"]["foundation"]["versions"]) < 2 and time.time() < deadline:
        try:
            status = module._client().train_status()
            assert status.get("status") != "ERROR", "\n".join(status.get("details", []))
        except MONAILabelClientException:
            pass  # 404 until the round starts
        time.sleep(5)
    stats = module.fetch_info()["train_stats"]["foundation"]
    assert [v["version"] for v in stats["versions"]] == [0, 1], stats
    assert stats["versions"][-1]["labels_used"].keys() == set(labelled)
    assert stats["versions"][-1]["metrics"]["steps"] >= 10, "the module's params reach the trainer"

    # and the next sample is one nobody has labelled
    sample = module.next_sample("first")
    assert sample["id"] not in labelled
