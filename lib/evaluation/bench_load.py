"""Load benchmark: 8 simulated annotators click on different images while a training round and a scoring run go.

    python -m lib.evaluation.bench_load --data sample-data/build --out bench-results [--quick]

Each annotator is a thread with its own `MONAILabelClient` (the Slicer module's client) and its own image. It works
like a person: it picks a structure, clicks its most interior point on the structure's middle slice (a first click
on a new slice: the encoder runs), then adds clicks at random points of the structure on that slice (the slice is
encoded: a click the mask already holds costs no decode, one outside it decodes the object there), with a think time
between clicks, then moves to the next structure. Two phases, on one server: quiet (nothing else running) and loaded
(a training round and a `foundation_uncertainty` scoring run are started first and are checked to be running
throughout). Reports every failed request, the latency of clicks on encoded and on new slices (p50/p95/max), and the
resident memory of the server process (the subprocesses that train and score are reported apart: they are separate
processes with their own model).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
import requests
from monailabel.client import MONAILabelClient

from lib.atomic import scratch_dir
from lib.evaluation.bench_serving import PeakMemory, wait_for_compiled_decoder
from lib.evaluation.ground_truth import centre_click, middle_slice
from lib.evaluation.server import ServerProcess

logger = logging.getLogger("bench.load")


@dataclass(frozen=True)
class LoadConfig:
    annotators: int = 8
    structures: int = 4  # per annotator, one slice each
    clicks_per_slice: int = 4  # the first encodes the slice, the others reuse it
    think_seconds: tuple[float, float] = (0.5, 1.5)  # between two clicks of one annotator
    seed: int = 0


@dataclass
class Click:
    annotator: int
    image: str
    seconds: float
    cached: bool  # the slice was already encoded
    phase: str
    task_seconds: float  # inside the infer task (the rest: queueing, HTTP, result encoding and transfer)


def click_plan(truth: np.ndarray, labels: dict[str, int], config: LoadConfig, rng: random.Random) -> list[dict]:
    """Request params of one annotator: per structure, a centre click, then more foreground clicks inside it."""
    plan = []
    present = [v for v in labels.values() if (truth == v).any()]
    for value in rng.sample(present, min(config.structures, len(present))):
        structure = truth == value
        z = middle_slice(structure)
        inside = np.argwhere(structure[:, :, z])
        points = [centre_click(structure[:, :, z]) + [z]]
        plan.append({"foreground": list(points), "background": []})
        for _ in range(config.clicks_per_slice - 1):
            x, y = inside[rng.randrange(len(inside))]
            points.append([int(x), int(y), z])
            plan.append({"foreground": list(points), "background": []})
    return plan


def run_annotators(
    url: str, plans: dict[str, list[dict]], config: LoadConfig, phase: str, tmpdir: str
) -> tuple[list[Click], list[str]]:
    """Run one thread per image in `plans`; returns every click's latency and every failed request."""
    clicks: list[Click] = []
    errors: list[str] = []
    lock = threading.Lock()

    def annotator(number: int, image: str, plan: list[dict]) -> None:
        rng = random.Random(config.seed * 1000 + number)
        client = MONAILabelClient(url, tmpdir=tmpdir, client_id=f"annotator-{number}")
        for params in plan:
            time.sleep(rng.uniform(*config.think_seconds))
            begin = time.perf_counter()
            try:
                _, info = client.infer("foundation_2d", image, params)
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"{phase} annotator {number} {image}: {error}")
                continue
            with lock:
                seconds = time.perf_counter() - begin
                clicks.append(Click(number, image, seconds, bool(info["cached_embedding"]), phase, info["latency"]))

    threads = [
        threading.Thread(target=annotator, args=(i, image, plan), daemon=True)
        for i, (image, plan) in enumerate(plans.items())
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clicks, errors


def latency_summary(clicks: list[Click]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float | int]:
        if not values:
            return {"n": 0}
        return {
            "n": len(values),
            "p50": round(float(np.percentile(values, 50)), 3),
            "p95": round(float(np.percentile(values, 95)), 3),
            "max": round(max(values), 3),
        }

    return {
        "encoded_slice": stats([c.seconds for c in clicks if c.cached]),
        "new_slice": stats([c.seconds for c in clicks if not c.cached]),
        "encoded_slice_in_task": stats([c.task_seconds for c in clicks if c.cached]),
        "new_slice_in_task": stats([c.task_seconds for c in clicks if not c.cached]),
    }


def task_running(url: str, kind: str) -> bool:
    """Whether MONAI Label's last `train` or `scoring` task is still running."""
    try:
        response = requests.get(f"{url}/{kind}/", timeout=30)
        return response.ok and response.json().get("status") == "RUNNING"
    except (requests.RequestException, ValueError):
        return False


def start_background_work(url: str, labelled: dict[str, Path], timeout: float = 300) -> None:
    """Save final labels, start a training round and a scoring run, and wait until both are running."""
    client = MONAILabelClient(url)
    for image, label in labelled.items():
        client.save_label(image, str(label), tag="final")
    client.train_start("foundation", {})
    requests.post(f"{url}/scoring/foundation_uncertainty", timeout=60).raise_for_status()
    deadline = time.time() + timeout
    while not (task_running(url, "train") and task_running(url, "scoring")) and time.time() < deadline:
        time.sleep(1)
    if not (task_running(url, "train") and task_running(url, "scoring")):
        raise RuntimeError("the training round and the scoring run did not both start")


def stop_background_work(url: str) -> None:
    for kind in ("train", "scoring"):
        requests.delete(f"{url}/{kind}/", timeout=60)


def plans_for(data: Path, images: list[str], config: LoadConfig) -> dict[str, list[dict]]:
    labels = json.loads((data / "labels.json").read_text())
    plans = {}
    for number, image in enumerate(images):
        truth = np.asarray(nib.load(data / "ground-truth" / f"{image}.nii.gz").dataobj)
        plans[image] = click_plan(truth, labels, config, random.Random(config.seed * 1000 + number))
    return plans


def run(data: Path, out: Path, config: LoadConfig, extra_conf: dict[str, str] | None = None) -> dict[str, Any]:
    extra_conf = extra_conf or {}
    available = sorted(p.name.removesuffix(".nii.gz") for p in (data / "studies").glob("*.nii.gz"))
    if len(available) < config.annotators + 2:
        raise SystemExit(f"need {config.annotators + 2} studies in {data}, found {len(available)}")
    annotated, labelled = available[: config.annotators], available[config.annotators : config.annotators + 2]
    studies = scratch_dir("bench-load-studies-")
    for image in available:
        (studies / f"{image}.nii.gz").symlink_to((data / "studies" / f"{image}.nii.gz").resolve())
    conf = {
        "labels": str(data / "labels.json"),
        "model_dir": str(scratch_dir("bench-load-model-")),
        "train_every_labels": "0",  # the round is started by hand, at a known time
        "train_interval_minutes": "0",
        **extra_conf,
    }
    cache_mb = 1024  # the default --conf cache_mb
    plans = plans_for(data, annotated, config)
    log = out / "load-server.log"
    results: dict[str, Any] = {"config": asdict(config), "cache_budget_mb": cache_mb, "conf": extra_conf}
    tmpdir = str(scratch_dir("bench-load-client-"))
    with ServerProcess(studies, log, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}) as server:
        wait_for_compiled_decoder(log)
        time.sleep(5)  # the background warm-up (encoder export) settles
        results["server_rss_idle_mb"] = round(psutil.Process(server.pid).memory_info().rss / 2**20)
        with PeakMemory(server.pid) as memory:
            logger.info("quiet phase: %d annotators, nothing else running", config.annotators)
            quiet, quiet_errors = run_annotators(server.url, plans, config, "quiet", tmpdir)
            results["quiet"] = {"latency": latency_summary(quiet), "failed": quiet_errors}
            results["quiet"]["server_rss_peak_mb"] = round(memory.server_peak / 2**20)
        # the same clicks again on slices now cached would not be a fair loaded phase: other structures instead
        loaded_config = LoadConfig(**{**asdict(config), "seed": config.seed + 1})
        loaded_plans = plans_for(data, annotated, loaded_config)
        start_background_work(server.url, {image: data / "ground-truth" / f"{image}.nii.gz" for image in labelled})
        with PeakMemory(server.pid) as memory:
            logger.info("loaded phase: %d annotators while a training round and a scoring run go", config.annotators)
            loaded, loaded_errors = run_annotators(server.url, loaded_plans, loaded_config, "loaded", tmpdir)
            still_running = {kind: task_running(server.url, kind) for kind in ("train", "scoring")}
            results["loaded"] = {
                "latency": latency_summary(loaded),
                "failed": loaded_errors,
                "background_still_running": still_running,
                "server_rss_peak_mb": round(memory.server_peak / 2**20),
                "subprocesses_rss_peak_mb": round(memory.children_peak / 2**20),
            }
        stop_background_work(server.url)
    results["clicks"] = [asdict(c) for c in quiet + loaded]
    return results


def report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# Load: {results['config']['annotators']} annotators ({meta['date']}, {meta['machine']})"
        + "".join(f", --conf {key} {value}" for key, value in results.get("conf", {}).items()),
        "",
        "| phase | failed | encoded slice p50 / p95 / max (s) | new slice p50 / p95 / max (s) | server RSS peak |",
        "| --- | --- | --- | --- | --- |",
    ]
    for phase in ("quiet", "loaded"):
        part = results[phase]
        cells = []
        for kind in ("encoded_slice", "new_slice"):
            s = part["latency"][kind]
            cells.append(f"{s['p50']} / {s['p95']} / {s['max']} (n={s['n']})" if s["n"] else "-")
        lines.append(f"| {phase} | {len(part['failed'])} | {cells[0]} | {cells[1]} | {part['server_rss_peak_mb']} MB |")
    loaded = results["loaded"]
    lines += [
        "",
        f"Server RSS when idle after warm-up: {results['server_rss_idle_mb']} MB; embedding cache budget "
        f"{results['cache_budget_mb']} MB. Training + scoring subprocesses peak: "
        f"{loaded['subprocesses_rss_peak_mb']} MB. Still running at the end of the loaded phase: "
        f"{loaded['background_still_running']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 structures per annotator instead of 4")
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="a server --conf, repeatable"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    config = LoadConfig(annotators=args.annotators, structures=2 if args.quick else 4)
    begin = time.time()
    results = run(args.data, args.out, config, dict(args.conf))
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores",
        "seconds": round(time.time() - begin),
    }
    (args.out / "load.json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    text = report(results, meta)
    (args.out / "load.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
