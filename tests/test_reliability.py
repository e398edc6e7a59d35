"""Bad input is refused with a 4xx naming it, no id reaches outside the datastore, and a server killed with
SIGKILL in the middle of label saves comes back with every acknowledged label. Real server, real client."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import QUIET_ENV, quiet_server_conf, server_folders
from lib.atomic import writer_alive
from lib.evaluation.server import ServerProcess
from lib.model.versions import VersionStore

pytestmark = pytest.mark.slow


def _conf(sample_data: Path, model_dir: Path) -> dict[str, str]:
    return quiet_server_conf(sample_data, model_dir, max_megavoxels="64")  # the samples have 5.1 million voxels


@pytest.fixture(scope="module")
def guarded(sample_data, tmp_path_factory):
    studies, log = server_folders(sample_data, tmp_path_factory, "-guarded")
    conf = _conf(sample_data, tmp_path_factory.mktemp("model-guarded"))
    with ServerProcess(studies, log, conf, env=QUIET_ENV) as server:
        yield server


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _put_label(url: str, image: str, path: Path, tag: str = "final", params: str = "{}") -> requests.Response:
    with open(path, "rb") as handle:
        return requests.put(
            f"{url}/datastore/label",
            params={"image": image, "tag": tag},
            data={"params": params},
            files={"label": (path.name, handle)},
            timeout=60,
        )


def test_bad_labels_are_refused_by_name_and_leave_nothing(guarded, sample_data, tmp_path):
    studies = Path(guarded.studies)
    truth = nib.load(sample_data / "ground-truth" / "sub-01.nii.gz")
    data = np.asarray(truth.dataobj).astype(np.uint8)
    shifted = truth.affine.copy()
    shifted[:3, 3] += 5.0
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes((sample_data / "ground-truth" / "sub-01.nii.gz").read_bytes()[:5000])
    big = tmp_path / "big.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 300))  # 79 million voxels: over this server's 64 million
    header.set_data_dtype(np.uint8)
    big.write_bytes(gzip.compress(header.binaryblock + bytes(4)))  # a header claiming a huge volume
    cases = [
        (_write(tmp_path / "shape.nii.gz", data[:, :, :-1], truth.affine), "sub-01", 422, "does not match the image"),
        (_write(tmp_path / "moved.nii.gz", data, shifted), "sub-01", 422, "affines differ"),
        (_write(tmp_path / "values.nii.gz", np.where(data > 0, 42, 0).astype(np.uint8), truth.affine), "sub-01",
         422, "label values [42] are not among the known labels"),
        (cut, "sub-01", 422, "truncated or corrupt"),
        (big, "sub-01", 413, "79 million voxels"),
        (_write(tmp_path / "fine.nii.gz", data, truth.affine), "no-such-image", 404, "unknown image 'no-such-image'"),
    ]  # fmt: skip
    before = _files(studies)
    for path, image, status, message in cases:
        response = _put_label(guarded.url, image, path)
        assert response.status_code == status, (path.name, response.text)
        assert message in response.json()["detail"], (path.name, response.text)
    wrong_type = tmp_path / "label.png"
    wrong_type.write_bytes(b"\x89PNG not really")
    response = _put_label(guarded.url, "sub-01", wrong_type)
    assert response.status_code == 415 and ".nii.gz" in response.json()["detail"]
    response = _put_label(guarded.url, "sub-01", tmp_path / "fine.nii.gz", params="{not json")
    assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]
    assert _files(studies) == before, "a refused upload left a file in the datastore"


def test_ids_tags_and_paths_cannot_leave_the_datastore(guarded, sample_data, tmp_path):
    studies = Path(guarded.studies)
    label = sample_data / "ground-truth" / "sub-02.nii.gz"
    response = _put_label(guarded.url, "sub-02", label, tag="../../escaped")
    assert response.status_code == 400 and "label tag" in response.json()["detail"]
    assert not (studies.parent / "escaped").exists() and not (studies / "escaped").exists()

    with open(studies / "sub-02.nii.gz", "rb") as handle:
        response = requests.put(
            f"{guarded.url}/datastore/image", params={"image": "../outside"}, files={"file": ("x.nii.gz", handle)}
        )
    assert response.status_code == 400 and "image id '../outside'" in response.json()["detail"]
    assert not (studies.parent / "outside.nii.gz").exists()

    client = MONAILabelClient(guarded.url)
    model_file = next(Path(guarded.conf["model_dir"]).rglob("*.json"))  # a file the server can read
    for image, params in [(str(model_file), {}), ("/etc/passwd", {}), ("sub-01", {"image": str(model_file)})]:
        with pytest.raises(MONAILabelClientException) as error:
            client.infer("foundation_2d", image, {"foreground": [[10, 10, 10]], **params})
        assert "Status: 404;" in error.value.msg and "datastore id" in error.value.msg


def test_an_absurdly_large_image_in_the_datastore_is_a_413_not_an_out_of_memory(guarded):
    """A 79-million-voxel volume (80 kB of gzip) dropped into the studies folder: refused from its header."""
    studies = Path(guarded.studies)
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 300))
    header.set_data_dtype(np.int16)
    with gzip.open(studies / "huge.nii.gz", "wb") as out:
        out.write(header.binaryblock + bytes(4))
        for _ in range(300):
            out.write(bytes(512 * 512 * 2))
    client = MONAILabelClient(guarded.url)
    deadline = time.time() + 30  # the datastore notices new files by watching the folder
    while "huge" not in client.datastore()["objects"] and time.time() < deadline:
        time.sleep(0.5)
    try:
        with pytest.raises(MONAILabelClientException) as error:
            client.infer("foundation_2d", "huge", {"foreground": [[10, 10, 10]]})
        assert "Status: 413;" in error.value.msg and "79 million voxels" in error.value.msg
    finally:
        (studies / "huge.nii.gz").unlink()


def test_model_weights_cannot_be_uploaded_over_the_served_version(guarded, tmp_path):
    weights = tmp_path / "evil.pt"
    weights.write_bytes(b"not weights")
    with open(weights, "rb") as handle:
        response = requests.put(f"{guarded.url}/model/foundation", files={"file": ("evil.pt", handle)}, timeout=30)
    assert response.status_code == 403 and "rollback" in response.json()["detail"]
    assert not list(Path(guarded.conf["model_dir"]).rglob("evil*"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_during_label_saves_loses_no_acknowledged_label(sample_data, labels, tmp_path_factory, tmp_path):
    """Three annotators save labels in a loop; the server is killed with SIGKILL mid-stream and restarted."""
    studies, log = server_folders(sample_data, tmp_path_factory, "-sigkill")
    conf = _conf(sample_data, tmp_path_factory.mktemp("model-sigkill"))
    images = ["sub-01", "sub-02", "sub-03"]
    drafts = {}  # two valid labels per image: the whole truth, and the truth without its first structure
    for image in images:
        truth = nib.load(sample_data / "ground-truth" / f"{image}.nii.gz")
        data = np.asarray(truth.dataobj).astype(np.uint8)
        drafts[image] = [
            _write(tmp_path / f"{image}-a.nii.gz", data, truth.affine),
            _write(tmp_path / f"{image}-b.nii.gz", np.where(data == 1, 0, data).astype(np.uint8), truth.affine),
        ]
    acknowledged: dict[str, list[str]] = {image: [] for image in images}
    in_flight: dict[str, str] = {}
    stop = threading.Event()

    def annotator(image: str, url: str) -> None:
        client = MONAILabelClient(url, client_id=f"annotator-{image}")
        for i in range(10_000):
            if stop.is_set():
                return
            draft = drafts[image][i % 2]
            in_flight[image] = _digest(draft)
            try:
                client.save_label(image, str(draft), tag="final")
            except Exception:  # noqa: BLE001 - the server is gone; what was not acknowledged may be lost
                return
            acknowledged[image].append(in_flight[image])

    server = ServerProcess(studies, log, conf, env=QUIET_ENV).start()
    try:
        threads = [threading.Thread(target=annotator, args=(image, server.url)) for image in images]
        for thread in threads:
            thread.start()
        deadline = time.time() + 120
        while min(len(a) for a in acknowledged.values()) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert min(len(a) for a in acknowledged.values()) >= 3, "the annotators could not save labels"
        time.sleep(random.Random(7).uniform(0.0, 0.5))
        server.process.kill()  # SIGKILL: no handler, no flush, no cleanup
        server.process.wait(timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        server.stop()

    with ServerProcess(studies, tmp_path / "restart.log", conf, env=QUIET_ENV) as restarted:
        objects = MONAILabelClient(restarted.url).datastore()["objects"]
        for image in images:
            stored = studies / "labels" / "final" / f"{image}.nii.gz"
            assert "final" in objects[image]["labels"], f"{image}: an acknowledged label is missing after SIGKILL"
            # the last acknowledged label, or the one being saved when the server died; never a torn file
            assert _digest(stored) in {acknowledged[image][-1], in_flight[image]}, image
            assert np.asarray(nib.load(stored).dataobj).max() > 0
            kept = list((studies / ".history" / "labels" / "final" / image).iterdir())
            assert len(kept) >= len(acknowledged[image]) - 1, f"{image}: earlier versions were not kept"
        json.loads((studies / "datastore_v2.json").read_text())
        assert not list(studies.rglob("*.tmp")), "a dead process's temporary file was not cleaned up"


def _kill_tree(server: ServerProcess) -> None:
    """SIGKILL the server and its training subprocess at once, as a power cut or the OOM killer would."""
    processes = [*server.children(), server.process]
    for process in processes:
        try:
            process.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    server.process.wait(timeout=30)
    # SIGKILL is delivered asynchronously (a writer blocked in fsync dies later): wait until every process is gone
    # or a zombie, as after a real crash, so that the next start sees its temporaries as a dead writer's.
    deadline = time.time() + 30
    while any(writer_alive(process.pid) for process in processes) and time.time() < deadline:
        time.sleep(0.05)


def _details(client: MONAILabelClient) -> str:
    try:
        return "\n".join(client.train_status().get("details", []))
    except MONAILabelClientException:  # 404 before the first round starts
        return ""


def _served_model_loads(model_dir: Path) -> int:
    """The served version's number, after loading its weights the way the server does (digest checked)."""
    base = json.loads((model_dir / "versions" / "v0000" / "meta.json").read_text())["base"]
    store = VersionStore(model_dir, base)
    assert not list(store.root.glob(".tmp-*")), "a half-written version survived the restart"
    served = store.served()
    store.load_state(served)
    return served


def test_sigkill_during_training_and_during_publishing_leaves_a_served_model_that_loads(
    sample_data, tmp_path_factory, tmp_path
):
    studies, log = server_folders(sample_data, tmp_path_factory, "-killtrain")
    model_dir = tmp_path_factory.mktemp("model-killtrain")
    conf = {**_conf(sample_data, model_dir), "train_steps": "10", "train_slice_step": "8"}
    versions = model_dir / "versions"

    with ServerProcess(studies, log, conf, env=QUIET_ENV) as server:
        client = MONAILabelClient(server.url)
        for image in ("sub-01", "sub-02"):
            client.save_label(image, str(sample_data / "ground-truth" / f"{image}.nii.gz"), tag="final")
        client.train_start("foundation", {})
        deadline = time.time() + 300
        while "epochs of" not in _details(client) and time.time() < deadline:  # the optimiser is running
            time.sleep(0.2)
        assert "epochs of" in _details(client) and server.children(), "no training subprocess to kill"
        _kill_tree(server)  # 1: in the middle of training
    assert _served_model_loads(model_dir) == 0

    # The version store holds a written-but-unpublished version for 30 s, so the kill lands in that window on any
    # machine (polling for a write that takes milliseconds missed it on a loaded CI machine).
    held = {**QUIET_ENV, "MEDFOUNDATION_TEST_PAUSE_BEFORE_PUBLISH_S": "30"}
    with ServerProcess(studies, tmp_path / "second.log", conf, env=held) as server:
        client = MONAILabelClient(server.url)
        client.train_start("foundation", {})
        deadline, caught = time.time() + 600, None
        while caught is None and time.time() < deadline:
            tmp = next(iter(versions.glob(".tmp-v*")), None)  # the new version being written
            caught = tmp if tmp is not None and (tmp / "meta.json").exists() else None
            time.sleep(0.05)
        if caught is not None:
            _kill_tree(server)  # 2: while the new version's files are being written
    assert caught is not None, "the round ended before its version was seen being written"
    assert _served_model_loads(model_dir) == 0

    with ServerProcess(studies, tmp_path / "third.log", conf, env=QUIET_ENV) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        stats = client.info()["train_stats"]["foundation"]
        assert stats["served_version"] == 0 and [v["version"] for v in stats["versions"]] == [0]
        assert set(client.datastore()["objects"]["sub-01"]["labels"]) == {"final"}
        _, params = client.infer("foundation_2d", "sub-01", {"foreground": [[60, 70, 40]]})
        assert params["slice"] == 40
        # and a round now runs to the end and is stored as version 1
        client.train_start("foundation", {})
        deadline = time.time() + 600
        while len(client.info()["train_stats"]["foundation"]["versions"]) < 2 and time.time() < deadline:
            time.sleep(2)
        assert [v["version"] for v in client.info()["train_stats"]["foundation"]["versions"]] == [0, 1]
    assert _served_model_loads(model_dir) in (0, 1)
