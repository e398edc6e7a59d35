"""Benchmark of the serving path: accuracy from ground-truth prompts and latency, through the real HTTP API.

    python -m lib.evaluation.bench_serving --data sample-data/build --out bench-results [--quick]
        [--conf propagation_planes 3]

Starts `monailabel start_server --app apps/medfoundation` on the sample studies, drives it with
`monailabel.client.MONAILabelClient` (the Slicer module's client), and writes `serving.json` and `serving.md`.
Prompts follow the CVPR 2025 interactive 3D challenge: a 2D box on the structure's middle slice, plus its
z-range for 3D; a click is the most interior pixel of the middle slice's cross-section.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
from monailabel.client import MONAILabelClient

from lib.atomic import scratch_dir
from lib.evaluation.ground_truth import box_on_slice, centre_click, dice, middle_slice, roi_3d
from lib.evaluation.server import ServerProcess

logger = logging.getLogger("bench")

# Measured on this 2-core machine with MONAI Label 0.8.5's sample radiology app (shared/DESIGN.md).
MONAILABEL_SAM2 = {"sam_2d_seconds_per_click": "2.0-3.7", "sam_3d_seconds_32_slices": 63.0}


class PeakMemory:
    """Samples the resident memory of a process and its children every 0.2 s, in bytes: `.peak` of both
    together, `.server_peak` of the process alone, `.children_peak` of its children (train, scoring) alone."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.server_peak = self.children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                server = self.process.memory_info().rss
                children = sum(c.memory_info().rss for c in self.process.children(True))
                self.peak = max(self.peak, server + children)
                self.server_peak = max(self.server_peak, server)
                self.children_peak = max(self.children_peak, children)
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_for_compiled_decoder(log: Path, timeout: float = 300) -> None:
    """Latency is measured on the served configuration: wait until the background compile has finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text()
        if "decoder compiled for 4 box(es)" in text or "compiling the decoder failed" in text:
            return
        time.sleep(1)
    logger.warning("decoder not compiled after %.0f s; measuring anyway", timeout)


def timed_infer(client: MONAILabelClient, model: str, image: str, params: dict) -> tuple[float, np.ndarray, dict]:
    begin = time.perf_counter()
    result_file, info = client.infer(model, image, params)
    seconds = time.perf_counter() - begin
    data = np.asarray(nib.load(result_file).dataobj) if result_file.endswith((".nii", ".nii.gz")) else None
    Path(result_file).unlink(missing_ok=True)
    return seconds, data, info


def run(data: Path, out: Path, subjects: int, repeats: int, extra_conf: dict[str, str] | None = None) -> dict:
    labels = json.loads((data / "labels.json").read_text())
    available = sorted(p.name.removesuffix(".nii.gz") for p in (data / "studies").glob("*.nii.gz"))
    if len(available) < subjects + 1:
        raise SystemExit(f"need {subjects + 1} studies in {data} (one kept cold for latency), found {len(available)}")
    images, cold = available[:subjects], available[-1]
    studies = scratch_dir("bench-studies-")
    for image in [*images, cold]:
        (studies / f"{image}.nii.gz").symlink_to((data / "studies" / f"{image}.nii.gz").resolve())
    conf = {"labels": str(data / "labels.json"), "prefetch_slices": "0", **(extra_conf or {})}
    per_structure: dict[str, dict[str, list[float]]] = {name: {} for name in labels}
    latency: dict[str, list[float]] = {}
    propagation: list[dict] = []
    with ServerProcess(studies, out / "server.log", conf) as server, PeakMemory(server.pid) as memory:
        wait_for_compiled_decoder(out / "server.log")
        client = MONAILabelClient(server.url, tmpdir=str(scratch_dir("bench-client-")))
        for image in images:
            truth_all = np.asarray(nib.load(data / "ground-truth" / f"{image}.nii.gz").dataobj)
            for name, index in labels.items():
                truth = truth_all == index
                if not truth.any():
                    continue
                z = middle_slice(truth)
                box = box_on_slice(truth, z)
                seconds, mask, info = timed_infer(client, "foundation_2d", image, {"roi": box})
                key = "click_cached" if info["cached_embedding"] else "first_click_new_slice"
                latency.setdefault(key, []).append(seconds)
                per_structure[name].setdefault("dice_2d_box", []).append(dice(mask[:, :, z], truth[:, :, z]))
                click = centre_click(truth[:, :, z]) + [z]
                seconds, mask, _ = timed_infer(client, "foundation_2d", image, {"foreground": [click]})
                latency.setdefault("click_only_cached", []).append(seconds)
                per_structure[name].setdefault("dice_2d_click", []).append(dice(mask[:, :, z], truth[:, :, z]))
                # the box is the middle slice's, so propagation starts there (as the simulated annotator does);
                # with the roi alone the server starts at (z0 + z1) // 2, one slice off when the extent is even
                seconds, mask, info = timed_infer(client, "foundation", image, {"roi": roi_3d(truth), "slice": z})
                per_structure[name].setdefault("dice_3d_box", []).append(dice(mask, truth))
                propagation.append({"image": image, "structure": name, "seconds": seconds, **info})
                logger.info(
                    "%s %s: 2D box %.3f, 2D click %.3f, 3D %.3f (%.1f s, %d slices)",
                    image,
                    name,
                    per_structure[name]["dice_2d_box"][-1],
                    per_structure[name]["dice_2d_click"][-1],
                    per_structure[name]["dice_3d_box"][-1],
                    seconds,
                    info["slices_segmented"],
                )
        # latency on an image nobody has touched yet: its embeddings are not in the cache
        truth_all = np.asarray(nib.load(data / "ground-truth" / f"{cold}.nii.gz").dataobj)
        for index in list(labels.values())[:4]:
            truth = truth_all == index
            z = middle_slice(truth)
            seconds, _, _ = timed_infer(
                client, "foundation_2d", cold, {"foreground": [centre_click(truth[:, :, z]) + [z]]}
            )
            latency.setdefault("first_click_cold_slice_click_only", []).append(seconds)
        truth = truth_all == labels[next(iter(labels))]
        seconds, _, info = timed_infer(client, "foundation", cold, {"roi": roi_3d(truth), "slice": middle_slice(truth)})
        cold_propagation = {"seconds": seconds, **info}
        # repeated clicks on an encoded slice, in the formats the clients ask for
        truth = np.asarray(nib.load(data / "ground-truth" / f"{images[0]}.nii.gz").dataobj) == 1
        z = middle_slice(truth)
        formats = {
            "repeat_click_niigz": {},
            "repeat_click_nii": {"result_extension": ".nii", "result_compress": False},
            "repeat_click_nrrd_ohif": {"result_extension": ".nrrd", "result_compress": False},
        }
        # each repeat nudges the box by a pixel or two, as a person adjusting it does: the exact same prompt
        # is answered from the predictor's remembered decodes and would time no decoder at all
        nudges = itertools.cycle(itertools.product(range(-2, 3), range(-2, 3), range(-1, 2)))  # 75 boxes
        x0, x1, y0, y1, z0, z1 = box_on_slice(truth, z)
        for key, extra in formats.items():
            for _ in range(repeats):
                dx0, dy0, dx1 = next(nudges)
                params = {"roi": [x0 + dx0, x1 + dx1, y0 + dy0, y1, z0, z1], **extra}
                latency.setdefault(key, []).append(timed_infer(client, "foundation_2d", images[0], params)[0])
        peak_memory = memory.peak

    def mean(values):
        return round(float(np.mean(values)), 4) if values else None

    summary = {name: {k: mean(v) for k, v in scores.items()} for name, scores in per_structure.items() if scores}
    overall = {k: mean([s[k] for s in summary.values()]) for k in ("dice_2d_box", "dice_2d_click", "dice_3d_box")}
    slices = sum(p["slices_segmented"] for p in propagation)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "images": images,
        "conf": extra_conf or {},
        "accuracy": {"mean_over_structures": overall, "per_structure": summary},
        "latency_seconds": {k: {"median": round(statistics.median(v), 4), "n": len(v)} for k, v in latency.items()},
        "propagation_seconds_per_slice_warm_cache": round(sum(p["seconds"] for p in propagation) / max(1, slices), 4),
        "propagation_cold": {
            "image": cold,
            "slices": cold_propagation["slices_segmented"],
            "slices_encoded_now": cold_propagation["slices_encoded_now"],
            "seconds_per_slice": round(cold_propagation["seconds"] / max(1, cold_propagation["slices_segmented"]), 4),
        },
        "server_peak_rss_mb": round(peak_memory / 2**20),
        "anchors_monailabel_sam2_same_machine": MONAILABEL_SAM2,
    }
    return results


def report(results: dict) -> str:
    acc = results["accuracy"]
    lines = [
        f"# Serving benchmark ({results['date']}, {results['machine']})",
        "",
        f"Images: {', '.join(results['images'])}; server conf beyond the defaults: "
        f"{', '.join(f'{k} {v}' for k, v in results.get('conf', {}).items()) or 'none'}.",
        "Prompts from ground truth: a box on the structure's middle",
        "slice (3D adds its z-range); a click at the most interior pixel of that slice's cross-section.",
        "",
        "| structure | 2D box Dice | 2D one-click Dice | 3D box Dice |",
        "| --- | --- | --- | --- |",
    ]
    for name, scores in acc["per_structure"].items():
        lines.append(
            f"| {name} | {scores['dice_2d_box']:.3f} | {scores['dice_2d_click']:.3f} | {scores['dice_3d_box']:.3f} |"
        )
    m = acc["mean_over_structures"]
    lines += [
        f"| **mean** | **{m['dice_2d_box']:.3f}** | **{m['dice_2d_click']:.3f}** | **{m['dice_3d_box']:.3f}** |",
        "",
        "| latency (HTTP, end to end) | median | n |",
        "| --- | --- | --- |",
    ]
    for key, value in results["latency_seconds"].items():
        lines.append(f"| {key} | {value['median'] * 1000:.0f} ms | {value['n']} |")
    lines += [
        f"| 3D propagation per slice, cold image ({results['propagation_cold']['slices']} slices, "
        f"{results['propagation_cold']['slices_encoded_now']} encoded) | "
        f"{results['propagation_cold']['seconds_per_slice'] * 1000:.0f} ms | 1 |",
        f"| 3D propagation per slice, slices partly cached | "
        f"{results['propagation_seconds_per_slice_warm_cache'] * 1000:.0f} ms | {len(acc['per_structure'])} |",
        "",
        f"Server peak memory: {results['server_peak_rss_mb']} MB.",
        "MONAI Label's SAM2 tasks on the same machine (DESIGN.md): sam_2d 2.0-3.7 s per click,",
        "sam_3d 63 s for 32 slices.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one subject for accuracy, 10 repeats")
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="a server --conf, repeatable"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.subjects, args.repeats = 1, 10
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args.data, args.out, args.subjects, args.repeats, dict(args.conf))
    (args.out / "serving.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "serving.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
