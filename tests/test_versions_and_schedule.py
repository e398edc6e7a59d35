"""Model versions (atomic, verified, never lost) and the retraining schedule's decisions; no training here."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lib.engine.continual import LabelledImage, RoundError, split_by_volume
from lib.model.checkpoints import CheckpointError
from lib.model.versions import VersionError, VersionStore
from lib.trainers.schedule import RetrainSchedule, ScheduleConfig

BASE = "lite_medsam@79d8c9dca6db"


def _state() -> dict:
    return {"mask_decoder": {"w": torch.ones(2)}, "auto_head": {"b": torch.zeros(1)}}


def test_base_is_version_zero_and_served(tmp_path):
    store = VersionStore(tmp_path, BASE)
    assert store.versions() == [0]
    assert store.served() == 0
    assert store.load_state(0) is None
    assert store.meta(0)["base"] == BASE


def test_add_serve_rollback_and_history(tmp_path):
    store = VersionStore(tmp_path, BASE)
    first = store.add(_state(), {"metrics": {"validation": {"auto_mean": 0.5}}})
    assert (first, store.served()) == (1, 0), "a stored round is not served until the gate says so"
    store.serve(first, "better")
    second = store.add(_state(), {"reason": "worse"})
    assert store.served() == 1
    assert torch.equal(store.load_state(second)["mask_decoder"]["w"], torch.ones(2))
    history = store.history()
    assert [row["version"] for row in history] == [0, 1, 2]
    assert [row["served"] for row in history] == [False, True, False]
    assert history[1]["metrics"]["validation"]["auto_mean"] == 0.5
    store.serve(0, "rollback")
    assert store.served() == 0
    assert VersionStore(tmp_path, BASE).served() == 0, "the pointer survives a restart"


def test_tampered_weights_and_unknown_versions_are_refused(tmp_path):
    store = VersionStore(tmp_path, BASE)
    version = store.add(_state(), {})
    weights = store.root / "v0001" / "weights.pt"
    torch.save({"mask_decoder": {"w": torch.zeros(2)}}, weights)
    with pytest.raises(CheckpointError, match="SHA-256"):
        store.load_state(version)
    with pytest.raises(CheckpointError):
        store.serve(version, "tampered")
    assert store.served() == 0
    with pytest.raises(VersionError, match="does not exist"):
        store.serve(7, "no such version")


def test_half_written_version_is_invisible_and_numbers_continue(tmp_path):
    store = VersionStore(tmp_path, BASE)
    # what a crash in the middle of writing version 1 leaves behind
    (store.root / ".tmp-v0001-999").mkdir()
    (store.root / ".tmp-v0001-999" / "meta.json").write_text("{")
    assert store.versions() == [0]
    assert store.add(_state(), {}) == 1


def test_a_dead_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path):
    root = VersionStore(tmp_path, BASE).root
    dead, live = 2**22 + 12345, os.getpid()  # above Linux's default pid_max: no such process
    for pid in (dead, live):
        (root / f".tmp-v0001-{pid}").mkdir()
        (root / f".served.json.{pid}.tmp").write_text("{")
    VersionStore(tmp_path, BASE)
    assert not (root / f".tmp-v0001-{dead}").exists() and not (root / f".served.json.{dead}.tmp").exists()
    assert (root / f".tmp-v0001-{live}").exists() and (root / f".served.json.{live}.tmp").exists()


def test_version_of_another_base_model_is_refused(tmp_path):
    VersionStore(tmp_path, BASE).add(_state(), {})
    other = VersionStore(tmp_path, "mobile_sam@0123456789ab")
    with pytest.raises(VersionError, match="trained from"):
        other.load_state(1)


def test_unreadable_served_pointer_falls_back_to_the_base(tmp_path):
    store = VersionStore(tmp_path, BASE)
    (store.root / "served.json").write_text("not json")
    assert store.served() == 0
    json.loads((store.root / "v0000" / "meta.json").read_text())


def test_split_by_volume_is_stable_and_needs_two_volumes():
    images = [LabelledImage(f"sub-{i:02d}", "", "") for i in range(1, 9)]
    train, val = split_by_volume(images, 0.25)
    assert len(val) == 2 and len(train) == 6
    assert not {i.image_id for i in train} & {i.image_id for i in val}
    assert split_by_volume(list(reversed(images)), 0.25)[1] == val, "order of arrival must not change the split"
    assert len(split_by_volume(images[:2], 0.25)[1]) == 1
    with pytest.raises(RoundError, match="at least 2"):
        split_by_volume(images[:1], 0.25)


class FakeServer:
    def __init__(self) -> None:
        self.labels: set[tuple[str, float]] = set()
        self.used: set[tuple[str, float]] = set()
        self.is_running = False
        self.started = 0
        self.now = 0.0

    def new_labels(self) -> set[tuple[str, float]]:
        return self.labels - self.used

    def start_round(self) -> bool:
        self.started += 1
        self.is_running = True
        return True

    def finish_round(self, stored: bool = True) -> None:
        self.is_running = False
        if stored:
            self.used = set(self.labels)


def _schedule(server: FakeServer, every: int, minutes: float) -> RetrainSchedule:
    return RetrainSchedule(
        ScheduleConfig(every, minutes),
        server.new_labels,
        server.start_round,
        lambda: server.is_running,
        clock=lambda: server.now,
    )


def test_schedule_starts_after_n_labels_and_never_two_rounds_at_once():
    server = FakeServer()
    schedule = _schedule(server, every=2, minutes=0)
    server.labels = {("a", 1.0)}
    assert not schedule.tick()
    server.labels.add(("b", 1.0))
    assert schedule.tick() and server.started == 1
    server.labels |= {("c", 2.0), ("d", 2.0)}  # arrive during the round
    assert not schedule.tick(), "never two rounds at once"
    server.is_running = False
    server.used = {("a", 1.0), ("b", 1.0)}  # the round trained on the labels there when it started
    assert schedule.tick() and server.started == 2, "labels that came during a round start the next one"
    assert not schedule.tick(), "and only once"


def test_schedule_does_not_repeat_a_round_that_stored_nothing():
    server = FakeServer()
    schedule = _schedule(server, every=1, minutes=0)
    server.labels = {("a", 1.0)}
    assert schedule.tick()
    server.finish_round(stored=False)  # e.g. "a round needs at least 2 labelled volumes"
    assert not schedule.tick()
    server.labels.add(("a", 5.0))  # the label is re-submitted: new again
    assert schedule.tick()


def test_schedule_interval_needs_new_labels_and_time():
    server = FakeServer()
    schedule = _schedule(server, every=0, minutes=10)
    server.labels = {("a", 1.0)}
    server.now = 9 * 60
    assert not schedule.tick()
    server.now = 10 * 60
    assert schedule.tick()
    server.finish_round()
    server.now = 30 * 60
    assert not schedule.tick(), "time alone never starts a round"


def test_mlflow_tracking_logs_a_round(tmp_path, monkeypatch):
    from lib.engine.continual import RoundConfig
    from lib.trainers.foundation import FoundationTrainer

    monkeypatch.delenv("MONAI_LABEL_TRACKING_URI", raising=False)
    versions = VersionStore(tmp_path / "model", BASE)
    trainer = FoundationTrainer(None, versions, {"a": 1}, RoundConfig(), tmp_path / "embeddings", "mlflow")
    history = [{"epoch": 1, "loss": 0.9, "val_auto_dice": 0.2}, {"epoch": 2, "loss": 0.5, "val_auto_dice": 0.4}]
    metrics = {"history": history, "validation": {"auto_mean": 0.4, "prompted_mean": 0.8}, "round_seconds": 12.0}
    trainer._track(1, metrics)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'model' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medfoundation").experiment_id])
    assert run.info.run_name == "v0001"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_auto_dice")] == [0.2, 0.4]
    assert run.data.metrics["val_prompted_mean"] == 0.8
