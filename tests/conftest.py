"""Shared fixtures: sample data built fresh for the run, the real LiteMedSAM model, a real MONAI Label server."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.evaluation.server import ServerProcess  # noqa: E402


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_sample_data", REPO / "sample-data" / "build_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """Three sample studies built by the real builder into a fresh folder (never what an earlier run left).

    sub-01 and sub-02 are the ones labelled in the continual-learning tests; sub-03 stays held out.
    """
    out = tmp_path_factory.mktemp("sample-data")
    builder = _load_builder()
    builder.build(out, subjects=3, seed=builder.DEFAULT_SEED)
    return out


@pytest.fixture(scope="session")
def labels(sample_data) -> dict[str, int]:
    return json.loads((sample_data / "labels.json").read_text())


def load_truth(sample_data: Path, subject: str) -> np.ndarray:
    return np.asarray(nib.load(sample_data / "ground-truth" / f"{subject}.nii.gz").dataobj)


@pytest.fixture(scope="session")
def lite_model(tmp_path_factory):
    from lib.model import build_model

    return build_model("lite_medsam", model_dir=tmp_path_factory.mktemp("model"))


def server_folders(sample_data: Path, tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A fresh copy of the sample studies (a server's datastore writes beside them) and a log path."""
    studies = tmp_path_factory.mktemp(f"studies{name}")
    for image in sorted((sample_data / "studies").glob("*.nii.gz")):
        shutil.copy(image, studies / image.name)
    return studies, tmp_path_factory.mktemp(f"server{name}") / "server.log"


_SHARED_CONF: dict[str, str] = {}  # what every test server's --conf takes: the shared folders below


@pytest.fixture(scope="session", autouse=True)
def shared_encoder_exports(tmp_path_factory) -> Path:
    """One OpenVINO export folder for every test server and its train and scoring subprocesses: each loads the
    export the first one made (named by the encoder's weights) instead of exporting again (33 s a time on a
    slow CI machine). A trained version's encoder has other weights and still gets its own export."""
    folder = tmp_path_factory.mktemp("openvino")
    _SHARED_CONF["encoder_export_dir"] = str(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def shared_embeddings(tmp_path_factory) -> Path:
    """One slice-embedding folder for every test server of the session: the store names a volume by its
    content, so the sample volumes' training and scoring slices are encoded once a session (each server's copy
    of the studies included), not once a test. The engine-level round tests use it too."""
    folder = tmp_path_factory.mktemp("embeddings")
    _SHARED_CONF["embeddings_dir"] = str(folder)
    return folder


# scoring at start has its own tests (test_active_learning.py); elsewhere it would only compete for the CPU
QUIET_ENV = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


def quiet_server_conf(sample_data: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    """--conf of a test server that does only what its test asks: no pre-encoding, no decoder compile, no
    scheduled rounds, and a fresh model folder (versions of an earlier run must not be served)."""
    return {
        "labels": str(sample_data / "labels.json"),
        "prefetch_slices": "0",
        "compile_decoder": "false",
        "model_dir": str(model_dir),
        "train_every_labels": "0",
        "train_interval_minutes": "0",
        **_SHARED_CONF,
        **extra,
    }


def require_private_network() -> None:
    """The pacs group starts Orthanc, which listens on every interface: only a namespace with loopback alone will do
    (/sys/class/net may still show the host's interfaces, so ask the socket layer)."""
    if {name for _, name in socket.if_nameindex()} != {"lo"}:
        pytest.fail(
            "Orthanc listens on every interface: run the pacs tests inside a private network namespace "
            "(make test does: unshare --net sh -c 'ip link set lo up && pytest -m pacs')"
        )


def pacs_server(orthanc, sample_data: Path, work: Path, port: int | None = None, **conf: str) -> ServerProcess:
    """`monailabel start_server --studies <Orthanc's DICOMweb>` with a fresh DICOMweb cache (not yet started)."""
    env = {**QUIET_ENV, "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache")}
    conf = quiet_server_conf(sample_data, work / "model", **conf)
    return ServerProcess(orthanc.dicomweb, work / "server.log", conf, port=port, env=env)


@pytest.fixture(scope="session")
def server(sample_data, tmp_path_factory):
    """`monailabel start_server --app apps/medfoundation` on a copy of the sample studies, on loopback.

    Yields (url, studies folder, log path); stopped by its PID at the end.
    """
    studies, log = server_folders(sample_data, tmp_path_factory, "")
    # compiling the decoder takes a minute of CPU in the background; tests/test_fast_decoder.py covers it
    conf = quiet_server_conf(sample_data, tmp_path_factory.mktemp("model"), prefetch_slices="4")
    with ServerProcess(studies, log, conf, env=QUIET_ENV) as process:
        yield process.url, studies, log
