"""Eight annotators click on eight images while a training round and a scoring run go: no request fails.

Latency and memory under this load are figures for the benchmark (`python -m lib.evaluation.bench_load`,
README "Reliability"), not assertions here: a timed test flakes on a shared 2-core machine.
"""

from __future__ import annotations

import random
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import QUIET_ENV, quiet_server_conf
from lib.evaluation.bench_load import (
    LoadConfig,
    click_plan,
    run_annotators,
    start_background_work,
    stop_background_work,
    task_running,
)
from lib.evaluation.server import ServerProcess

pytestmark = pytest.mark.slow


def test_eight_annotators_get_every_answer_while_training_and_scoring_run(sample_data, labels, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    subjects = ["sub-01", "sub-02", "sub-03"]
    for subject in subjects:
        shutil.copy(sample_data / "studies" / f"{subject}.nii.gz", studies / f"{subject}.nii.gz")
    config = LoadConfig(annotators=8, structures=2, clicks_per_slice=3, think_seconds=(0.2, 0.6))
    plans = {}
    for number in range(config.annotators):  # eight images: copies of the three studies under their own names
        subject = subjects[number % 3]
        image = f"copy{number}-{subject}"
        shutil.copy(sample_data / "studies" / f"{subject}.nii.gz", studies / f"{image}.nii.gz")
        truth = np.asarray(nib.load(sample_data / "ground-truth" / f"{subject}.nii.gz").dataobj)
        plans[image] = click_plan(truth, labels, config, random.Random(number))
    conf = quiet_server_conf(sample_data, tmp_path / "model")
    with ServerProcess(studies, tmp_path / "server.log", conf, env=QUIET_ENV) as server:
        truth = {s: sample_data / "ground-truth" / f"{s}.nii.gz" for s in subjects[:2]}
        start_background_work(server.url, truth)
        clicks, errors = run_annotators(server.url, plans, config, "loaded", str(tmp_path / "client"))
        still_running = {kind: task_running(server.url, kind) for kind in ("train", "scoring")}
        stop_background_work(server.url)
    assert not errors, "\n".join(errors)
    assert len(clicks) == config.annotators * config.structures * config.clicks_per_slice
    assert {c.image for c in clicks} == set(plans)
    assert sum(c.cached for c in clicks) >= config.annotators * config.structures * (config.clicks_per_slice - 1)
    assert all(still_running.values()), f"the load was not real: {still_running}"
