"""Interactive benchmark: the simulated annotator (lib.evaluation.annotator) against the real server.

    python -m lib.evaluation.bench_interactive --data sample-data/build --out bench-results [--quick]
        [--models lite_medsam,mobile_sam]

For each model a fresh `monailabel start_server --app apps/medfoundation --conf model <name>` runs on the
studies, and every structure of every image gets both protocols through MONAILabelClient:
  * 3D (CVPR 2025 challenge): Dice after the box (+ z-range), after 1, 3 and 5 corrective clicks;
  * 2D (RITM): NoC@85 / NoC@90 on the structure's middle slice, clicks only, 20 when never reached.
Writes interactive.json, dice_vs_clicks.png and montage.png (ground truth and masks on a few slices).
Zero-shot: no model here has been trained on these studies (learning curves are bench_active's).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monailabel.client import MONAILabelClient

from lib.atomic import scratch_dir
from lib.evaluation.annotator import MAX_CLICKS, HttpSegmenter, clicks_to_reach, session_2d, session_3d
from lib.evaluation.bench_serving import PeakMemory
from lib.evaluation.ground_truth import middle_slice
from lib.evaluation.server import ServerProcess

logger = logging.getLogger("bench-interactive")
REPORTED_CLICKS = (0, 1, 3, 5)  # Dice after the box and after these many corrective clicks


def after(dices: list[float], steps: int) -> float:
    """Dice after `steps` prompts; a session that ended early (exact, or at its target) keeps its last value."""
    return dices[min(steps, len(dices) - 1)]


def run_model(
    model: str,
    data: Path,
    out: Path,
    images: list[str],
    structures: list[str],
    clicks: int,
    extra_conf: dict[str, str] | None = None,
) -> tuple[dict, list[dict]]:
    """Both protocols on every (image, structure) with one model's server; per-structure means and timings."""
    labels = json.loads((data / "labels.json").read_text())
    studies = scratch_dir("bench-interactive-")
    for image in images:
        (studies / f"{image}.nii.gz").symlink_to((data / "studies" / f"{image}.nii.gz").resolve())
    conf = {
        "model": model,
        "labels": str(data / "labels.json"),
        "model_dir": str(out / f"model-{model}"),  # never trained here: only the encoder export is reused
        "prefetch_slices": "0",
        "compile_decoder": "false",  # latency is bench_serving's; here the CPU goes to the sessions
        "train_every_labels": "0",
        "train_interval_minutes": "0",
        **(extra_conf or {}),
    }
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    sessions: dict[str, list[dict]] = {name: [] for name in structures}
    seconds: dict[str, list[float]] = {"3d": [], "2d": []}
    pictures: list[dict] = []
    begin = time.perf_counter()
    with (
        ServerProcess(studies, out / f"interactive-{model}.log", conf, env=env) as server,
        PeakMemory(server.pid) as memory,
    ):
        client = MONAILabelClient(server.url, tmpdir=str(scratch_dir("bench-client-")))
        for image in images:
            reference = nib.load(data / "studies" / f"{image}.nii.gz")
            truth_all = np.asarray(nib.load(data / "ground-truth" / f"{image}.nii.gz").dataobj)
            for name in structures:
                truth = truth_all == labels[name]
                if not truth.any():
                    continue
                three_d = session_3d(HttpSegmenter(client, "foundation", image, reference), truth, clicks)
                two_d = session_2d(HttpSegmenter(client, "foundation_2d", image, reference), truth)
                seconds["3d"] += three_d.seconds
                seconds["2d"] += two_d.seconds
                sessions[name].append({
                    "image": image,
                    "dice_3d": [round(d, 4) for d in three_d.dices],
                    "clicks_3d": [[*c.point, int(c.foreground)] for c in three_d.clicks],
                    "dice_2d": [round(d, 4) for d in two_d.dices],
                    "noc85": clicks_to_reach(two_d.dices, 0.85),
                    "noc90": clicks_to_reach(two_d.dices, 0.90),
                })  # fmt: skip
                logger.info(
                    "%s %s %s: 3D box %.3f -> %d clicks %.3f; 2D NoC@85 %d, NoC@90 %d",
                    model, image, name, three_d.dices[0], len(three_d.clicks), three_d.dices[-1],
                    sessions[name][-1]["noc85"], sessions[name][-1]["noc90"],
                )  # fmt: skip
                if image == images[0] and len(pictures) < 4:
                    z = middle_slice(truth)
                    pictures.append({
                        "image": image, "structure": name, "z": z, "truth": truth[:, :, z],
                        "box": three_d.first[:, :, z], "clicks": three_d.final[:, :, z],
                        "dice_box": three_d.dices[0], "dice_clicks": three_d.dices[-1],
                    })  # fmt: skip
        peak = memory.peak
    return summarise(model, sessions, seconds, peak, time.perf_counter() - begin), pictures


def summarise(model: str, sessions: dict[str, list[dict]], seconds: dict, peak: int, wall: float) -> dict:
    def mean(values) -> float:
        return round(float(np.mean(values)), 4)

    per_structure = {}
    for name, runs in sessions.items():
        if not runs:
            continue
        row = {f"dice_3d_{k}": mean([after(r["dice_3d"], k) for r in runs]) for k in REPORTED_CLICKS}
        row["noc85"] = mean([r["noc85"] for r in runs])
        row["noc90"] = mean([r["noc90"] for r in runs])
        per_structure[name] = row
    keys = next(iter(per_structure.values())).keys()
    all_runs = [r for runs in sessions.values() for r in runs]
    return {
        "model": model,
        "sessions": len(all_runs),
        "mean_over_structures": {k: mean([row[k] for row in per_structure.values()]) for k in keys},
        "per_structure": per_structure,
        # curves for the plot: mean Dice after k prompts, over every session
        "curve_3d": [mean([after(r["dice_3d"], k) for r in all_runs]) for k in range(max(REPORTED_CLICKS) + 1)],
        "curve_2d": [mean([after(r["dice_2d"], k) for r in all_runs]) for k in range(MAX_CLICKS)],
        "request_seconds_median": {k: round(statistics.median(v), 3) for k, v in seconds.items() if v},
        "server_peak_rss_mb": round(peak / 2**20),
        "wall_seconds": round(wall, 1),
        "sessions_detail": sessions,
    }


def plot_clicks(results: dict[str, dict], path: Path) -> None:
    """Dice against clicks, 3D (after the box) and 2D (clicks only), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model, result in results.items():
        left.plot(range(len(result["curve_3d"])), result["curve_3d"], "o-", label=model)
        right.plot(range(1, len(result["curve_2d"]) + 1), result["curve_2d"], ".-", label=model)
    left.set_xlabel("corrective clicks after the box (0 = box only)")
    left.set_ylabel("mean 3D Dice")
    left.set_title("3D: box + z-range, then clicks (CVPR 2025)", fontsize=10)
    right.set_xlabel("clicks")
    right.set_ylabel("mean 2D Dice, middle slice")
    right.set_title("2D: clicks only (RITM; a session stops at 0.90)", fontsize=10)
    for axis in (left, right):
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    left.set_xticks(range(len(next(iter(results.values()))["curve_3d"])))
    right.set_xticks([1, 5, 10, 15, 20])
    right.axhline(0.85, color="grey", linestyle=":")
    right.axhline(0.90, color="grey", linestyle="--")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_montage(pictures: list[dict], data: Path, model: str, path: Path) -> None:
    """A few slices: the image with the ground truth (green), the box's mask (orange) and after the clicks (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pictures:
        return
    figure, axes = plt.subplots(1, len(pictures), figsize=(3.2 * len(pictures), 3.6), squeeze=False)
    volumes: dict[str, np.ndarray] = {}
    for axis, picture in zip(axes[0], pictures, strict=True):
        if picture["image"] not in volumes:
            volumes[picture["image"]] = np.asarray(nib.load(data / "studies" / f"{picture['image']}.nii.gz").dataobj)
        xs, ys = np.nonzero(picture["truth"])
        pad = 12
        crop = (slice(max(0, xs.min() - pad), xs.max() + pad + 1), slice(max(0, ys.min() - pad), ys.max() + pad + 1))
        # voxel x runs left-right and y front-back: show x across, y up, as a radiological axial view would
        axis.imshow(volumes[picture["image"]][:, :, picture["z"]][crop].T, cmap="gray", origin="lower")
        for key, colour in (("truth", "lime"), ("box", "orange"), ("clicks", "red")):
            mask = picture[key][crop].T.astype(float)
            if mask.any():
                axis.contour(mask, levels=[0.5], colors=colour, linewidths=1.2)
        scores = f"box {picture['dice_box']:.2f} → clicks {picture['dice_clicks']:.2f}"
        axis.set_title(f"{picture['structure']} z={picture['z']}\n{scores}", fontsize=9)
        axis.axis("off")
    figure.suptitle(f"{model} on {pictures[0]['image']}: truth green, box orange, box + clicks red", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(results: dict[str, dict]) -> str:
    lines = [
        "## Interactive (simulated annotator over HTTP, zero-shot)",
        "",
        "3D: Dice after a box on the middle slice + z-range, then corrective clicks at the centre of the largest",
        "error region (CVPR 2025). 2D: NoC to reach Dice 0.85 / 0.90 on the middle slice, clicks only, 20 if never.",
        "",
        "| model | sessions | box | +1 | +3 | +5 | NoC@85 | NoC@90 | 3D request | 2D click | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, r in results.items():
        m, s = r["mean_over_structures"], r["request_seconds_median"]
        lines.append(
            f"| {model} | {r['sessions']} | {m['dice_3d_0']:.3f} | {m['dice_3d_1']:.3f} | {m['dice_3d_3']:.3f} | "
            f"{m['dice_3d_5']:.3f} | {m['noc85']:.1f} | {m['noc90']:.1f} | {s.get('3d', 0):.2f} s | "
            f"{s.get('2d', 0):.2f} s | {r['server_peak_rss_mb']} MB |"
        )
    for model, r in results.items():
        lines += ["", f"Per structure, {model} (3D box / +1 / +3 / +5; NoC@85 / NoC@90):", ""]
        for name, row in r["per_structure"].items():
            lines.append(
                f"- {name}: {row['dice_3d_0']:.3f} / {row['dice_3d_1']:.3f} / {row['dice_3d_3']:.3f} / "
                f"{row['dice_3d_5']:.3f}; {row['noc85']:.1f} / {row['noc90']:.1f}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--models", default="lite_medsam,mobile_sam")
    parser.add_argument("--images", default="sub-01,sub-02,sub-03")
    parser.add_argument("--structures", default="", help="comma-separated label names (default: all)")
    parser.add_argument("--clicks", type=int, default=5, help="corrective clicks after the 3D box")
    parser.add_argument("--quick", action="store_true", help="one image, four structures")
    parser.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="extra server --conf (A/B runs, e.g. --conf click_corrections false)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    labels = json.loads((args.data / "labels.json").read_text())
    structures = args.structures.split(",") if args.structures else list(labels)
    images = args.images.split(",")
    if args.quick:
        images, structures = images[:1], structures[::3][:4]
    unknown = [s for s in structures if s not in labels]
    if unknown:
        raise SystemExit(f"unknown structures {unknown}; known: {', '.join(labels)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in args.models.split(","):
        results[model], pictures = run_model(
            model, args.data, args.out, images, structures, args.clicks, dict(args.conf)
        )
        results[model]["conf"] = dict(args.conf)
        plot_montage(pictures, args.data, model, args.out / f"montage-{model}.png")
    (args.out / "interactive.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_clicks(results, args.out / "dice_vs_clicks.png")
    print(report(results))


if __name__ == "__main__":
    main()
