"""Active learning: the selection arithmetic, leases, the uncertainty score on the real model, and the server.

The server test goes the way a team does: scoring runs by itself at start (cold start, nothing learned),
annotators ask for images with MONAILabelClient (each with its own client_id), labels are saved, the schedule
trains a version, and the server rescores with that version.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils

from conftest import quiet_server_conf, server_folders
from lib.activelearning.leases import LeaseBook
from lib.engine.cache import EmbeddingCache
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.selection import diversity, pick_diverse, pick_uncertain
from lib.engine.uncertainty import (
    PARTS,
    Gamma,
    ScoreConfig,
    Shift,
    cold_start_scores,
    default_views,
    score_volume,
    view_stores,
)
from lib.engine.volumes import VolumeStore
from lib.evaluation.server import ServerProcess
from lib.model.auto_head import AutoHead
from lib.model.registry import LoadedModel

# ---- selection and leases (no model) ---------------------------------------------------------------------


def _unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, np.float32)
    return vector / np.linalg.norm(vector)


def test_uncertain_picks_the_highest_score_and_falls_back_to_unscored_images():
    rng = random.Random(0)
    assert pick_uncertain(["a", "b", "c"], {"a": 0.2, "b": 0.9, "c": None}, rng) == "b"
    assert pick_uncertain(["a", "b"], {"a": 0.5, "b": 0.5}, rng) == "a"  # ties: the smaller id, every time
    assert pick_uncertain(["x", "y"], {}, rng) in {"x", "y"}
    assert pick_uncertain([], {}, rng) is None


def test_diverse_prefers_an_unsure_image_unlike_the_labelled_ones():
    descriptors = {"near": _unit(1, 0.05), "far": _unit(0, 1), "labelled": _unit(1, 0)}
    spread = diversity(["near", "far"], descriptors, [descriptors["labelled"]])
    assert spread["far"] == 1.0 and spread["near"] < 0.01
    # equally unsure: the one far from what is labelled wins; uncertain alone would take "near" (higher score)
    scores = {"near": 0.8, "far": 0.7}
    chosen, why = pick_diverse(["near", "far"], scores, descriptors, [descriptors["labelled"]], random.Random(0))
    assert chosen == "far" and why["diversity"] == 1.0 and why["uncertainty"] == 0.7
    assert pick_uncertain(["near", "far"], scores, random.Random(0)) == "near"


def test_cold_start_scores_rank_typical_first_then_far_from_labelled_and_are_never_zero():
    descriptors = {"a": _unit(1, 0.1), "b": _unit(1, 0.12), "odd": _unit(0.2, 1)}
    nothing = cold_start_scores(descriptors, set())
    assert max(nothing, key=lambda i: nothing[i]["score"]) in {"a", "b"}
    assert nothing["odd"]["score"] == 0.5  # least typical, still not zero
    after_a = cold_start_scores(descriptors, {"a"})
    assert set(after_a) == {"b", "odd"} and after_a["odd"]["score"] == 1.0 > after_a["b"]["score"] >= 0.5


def test_leases_keep_an_image_to_one_annotator_until_it_expires():
    now = [1000.0]
    book = LeaseBook(minutes=1, clock=lambda: now[0])
    book.grant("sub-01", "alice")
    assert set(book.held_by_others("bob")) == {"sub-01"} and not book.held_by_others("alice")
    book.grant("sub-02", "alice")  # asking again hands the earlier image back
    assert set(book.held_by_others("bob")) == {"sub-02"}
    book.prune(labelled={"sub-02"})  # labelled: free
    assert not book.held_by_others("bob")
    book.grant("sub-03", "alice")
    now[0] += 61
    book.prune(labelled=set())
    assert not book.held_by_others("bob")
    book.seed([("sub-04", "carol", now[0] - 30), ("sub-05", "dave", now[0] - 90)])  # restart: one still valid
    assert set(book.held_by_others("bob")) == {"sub-04"}
    assert LeaseBook(minutes=0).grant("sub-01", "alice") is None  # leases off


def test_views_are_undone_exactly_on_the_low_res_grid():
    logits = torch.randn(2, 3, 256, 256)
    shift = Shift(8, scale=1.0)
    moved_back = shift.undo(shift.skip_pixels(logits))
    assert torch.equal(moved_back[..., :-8, :-8], logits[..., :-8, :-8])
    assert Shift(8, scale=0.25).border == 2
    with pytest.raises(ValueError, match="whole low-res pixels"):
        Shift(6, scale=0.25)
    pixels = torch.tensor([[0.0, 64.0, 255.0]])
    brighter = Gamma(0.75).encoder_pixels(pixels)
    assert brighter[0, 0] == 0 and brighter[0, 2] == 255 and brighter[0, 1] > 64


# ---- the score on the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_score_volume_on_the_real_model(sample_data, labels, lite_model, tmp_path, shared_encoder_exports):
    """Cold start: a descriptor and no score. With an automatic head (random weights here: the trained one is
    the server test's), every part lies in [0, 1], and a second call reuses every cached embedding."""
    predictor = SlicePredictor(
        lite_model, EmbeddingCache(1 << 30), encoder_runtime="auto", ir_dir=shared_encoder_exports
    )
    volume = VolumeStore(IntensityConfig()).get(sample_data / "studies" / "sub-01.nii.gz")
    config = ScoreConfig(slices=3, decoder_slices=2)
    views = default_views(config, 256, 256)
    stores = view_stores(tmp_path, lite_model.encoder_version, predictor.encode_pixels, 256, 256, views)

    cold = score_volume(lite_model, volume, stores, views, config)
    assert cold.score is None and cold.descriptor.shape == (256,)
    assert abs(float(np.linalg.norm(cold.descriptor)) - 1) < 1e-4

    torch.manual_seed(0)
    head = AutoHead(list(labels)).eval()
    trained = LoadedModel(lite_model.spec, lite_model.network, lite_model.checkpoint, lite_model.sha256, 1, head)
    first = score_volume(trained, volume, stores, views, config, previous=trained)
    encoded = sum(s.encoded_slices for s in stores.values())
    again = score_volume(trained, volume, stores, views, config, previous=trained)
    assert sum(s.encoded_slices for s in stores.values()) == encoded, "cached embeddings were not reused"
    assert again.score == first.score and 0 <= first.score <= 1
    assert set(first.labels) == set(labels)
    assert set(first.parts) <= set(PARTS) and all(0 <= v <= 1 for v in first.parts.values())
    if "version_disagreement" in first.parts:  # the same head twice agrees with itself
        assert first.parts["version_disagreement"] == 0.0
    not_found = sum(name not in first.labels or first.labels[name] == 1.0 for name in labels) / len(labels)
    assert first.parts["labels_not_found"] <= not_found

    # a head that finds nothing: every label scores 1, and the ranked view says why
    with torch.no_grad():
        head.classify.bias[0] = 1e4  # background wins everywhere
    blind = score_volume(trained, volume, stores, views, config)
    assert blind.score == 1.0 and blind.parts == {"labels_not_found": 1.0}, blind.parts


# ---- the server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def active_server(sample_data, tmp_path_factory):
    studies, log = server_folders(sample_data, tmp_path_factory, "-active")
    conf = quiet_server_conf(
        sample_data,
        tmp_path_factory.mktemp("model-active"),
        train_every_labels="2",
        train_steps="60",  # its head must find structures in a new volume (24 steps found none)
        train_slice_step="4",
        score_slices="4",
        lease_minutes="30",
    )
    with ServerProcess(studies, log, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}) as process:
        yield process


def _scores(client: MONAILabelClient) -> dict[str, dict]:
    objects = client.datastore()["objects"]
    return {i: o["image"]["info"].get("foundation_uncertainty") or {} for i, o in objects.items()}


def _wait(condition, timeout: float, what: str, log) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(3)
    pytest.fail(f"{what} within {timeout:.0f} s\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_annotators_get_the_most_uncertain_images_and_scores_follow_new_versions(active_server, sample_data):
    url, log = active_server.url, active_server.log
    alice = MONAILabelClient(url, tmpdir=str(log.parent), client_id="alice")
    bob = MONAILabelClient(url, tmpdir=str(log.parent), client_id="bob")
    carol = MONAILabelClient(url, tmpdir=str(log.parent), client_id="carol")
    info = alice.info()
    assert {"uncertain", "diverse", "random", "first"} <= set(info["strategies"])
    assert "foundation_uncertainty" in info["scoring"]
    with pytest.raises(MONAILabelClientException, match="404") as unknown:
        alice.next_sample("most_fun", {})
    assert "unknown strategy" in str(unknown.value) and "most_fun" in str(unknown.value)

    # scoring ran by itself at start: nothing learned yet, so every image has a cold-start score
    _wait(
        lambda: all(s.get("method") == "cold_start" for s in _scores(alice).values()),
        300,
        "no cold-start scores after the server started",
        log,
    )
    cold = _scores(alice)
    assert all(0.5 <= s["score"] <= 1 and s["version"] == 0 for s in cold.values()), cold

    # a label for sub-01; the cold start rescored on request knows it: the two others get distance-based scores
    alice.save_label("sub-01", str(sample_data / "ground-truth" / "sub-01.nii.gz"), tag="final")
    _score_now(alice, log)
    scores = _scores(alice)
    unlabelled = {i: s["score"] for i, s in scores.items() if i != "sub-01"}
    assert max(unlabelled.values()) == 1.0, scores  # the farthest from sub-01

    first = alice.next_sample("uncertain", {})
    assert first["id"] == max(sorted(unlabelled), key=lambda i: unlabelled[i])
    assert first["why"]["score"] == unlabelled[first["id"]] and first["client_id"] == "alice"
    assert first["foundation_uncertainty"]["method"] == "cold_start"  # the ranked view travels with the answer
    second = bob.next_sample("uncertain", {})
    assert second["id"] and second["id"] != first["id"], "two annotators were handed the same image"
    nothing = carol.next_sample("uncertain", {})
    assert nothing["id"] is None and "being annotated by others" in nothing["message"]
    assert alice.next_sample("diverse", {})["id"] == first["id"], "alice's own lease must not block her"

    # alice submits hers: with two labels the schedule trains version 1; the server serves it and rescores
    alice.save_label(first["id"], str(sample_data / "ground-truth" / f"{first['id']}.nii.gz"), tag="final")
    remaining = second["id"]

    def rescored() -> bool:
        stored = _scores(alice).get(remaining, {})
        return stored.get("version") == 1 and stored.get("method") == "model"

    _wait(rescored, 900, "the remaining image was not rescored with version 1", log)
    stored = _scores(alice)[remaining]
    assert 0 <= stored["score"] <= 1 and set(stored["labels"]) == set(info["labels"])
    # a 60-step head found structures in sub-03 in most runs (validation Dice 0.16) and next to none in one
    # (0.004): the parts are those of what it found, and the share it did not find
    assert 0 <= stored["parts"]["labels_not_found"] <= 1, stored["parts"]
    if stored["parts"]["labels_not_found"] < 1:
        expected = {"augmentation_disagreement", "entropy", "labels_not_found"}
        assert expected <= set(stored["parts"]), stored["parts"]
    else:
        assert stored["parts"] == {"labels_not_found": 1.0} and stored["score"] == 1.0, stored
    assert stored["model"].endswith("+v1") and stored["slices"], stored

    # asked again with the same version, scoring skips what is current
    summary = _score_now(alice, log)
    assert summary["skipped"] == 1 and summary["scored"] == 0 and summary["version"] == 1, summary

    # bob's image is still his; carol gets a clear answer once it is labelled too
    bob.save_label(remaining, str(sample_data / "ground-truth" / f"{remaining}.nii.gz"), tag="final")
    nothing = carol.next_sample("random", {})
    assert nothing["id"] is None and "nothing left to annotate" in nothing["message"]


def _score_now(client: MONAILabelClient, log) -> dict:
    """POST /scoring/foundation_uncertainty?run_sync=true once no background scoring run is going."""

    def idle() -> bool:
        status, _, _, _ = MONAILabelUtils.http_method("GET", client.get_server_url(), "/scoring/?check_if_running=true")
        return status == 404

    _wait(idle, 600, "a background scoring run did not finish", log)
    selector = "/scoring/foundation_uncertainty?run_sync=true"
    status, body, _, _ = MONAILabelUtils.http_method("POST", client.get_server_url(), selector, {})
    assert status == 200, body
    return json.loads(body)
