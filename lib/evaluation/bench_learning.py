"""Learning curve of continual training: Dice on held-out volumes after 0, 2, 4, 8 labelled volumes.

    python -m lib.evaluation.bench_learning --data sample-data/build --out bench-results/learning

Rounds run exactly as the `foundation` trainer runs them (lib.engine.continual.run_round: same split, gate
and version store), each starting from the version the previous round served, on sub-01..sub-N; then the
served version is scored on the held-out volumes (default sub-09..sub-12), which no round ever sees:
  * automatic: `foundation_auto`'s engine (lib.engine.auto.auto_segment), whole volume, 3D Dice per label;
  * prompted: `foundation`'s 3D engine (propagate) from the CVPR 2025 challenge's box (tight 2D box on the
    middle slice + z-range), 3D Dice per label.
Engine only, no HTTP (serving latency is bench_serving's). Writes results.json, report.md and a plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.auto import auto_segment
from lib.engine.cache import EmbeddingCache
from lib.engine.continual import LabelledImage, RoundConfig, run_round
from lib.engine.embedding_store import EmbeddingStore
from lib.engine.interactive import propagate
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.prompts import Prompt
from lib.engine.training import TrainConfig
from lib.engine.volumes import VolumeStore
from lib.evaluation.ground_truth import dice, roi_3d
from lib.model import build_model
from lib.model.versions import VersionStore
from lib.settings import AppSettings

logger = logging.getLogger("bench-learning")


def held_out_scores(
    predictor: SlicePredictor, volumes: VolumeStore, data: Path, subjects: list[str], labels: dict[str, int]
) -> dict:
    """Mean 3D Dice per label over the held-out subjects, automatic and box-prompted."""
    propagation = AppSettings(model=predictor.model.spec.name).propagation_config()  # the server's, this model's
    auto: dict[str, list[float]] = {n: [] for n in labels}
    boxed: dict[str, list[float]] = {n: [] for n in labels}
    seconds = {"auto": 0.0, "prompted": 0.0}
    for subject in subjects:
        volume = volumes.get(data / "studies" / f"{subject}.nii.gz")
        truth = np.asarray(nib.load(data / "ground-truth" / f"{subject}.nii.gz").dataobj)
        if predictor.model.auto_head is not None:
            begin = time.perf_counter()
            result = auto_segment(predictor, volume, labels)
            seconds["auto"] += time.perf_counter() - begin
            for name, value in labels.items():
                auto[name].append(dice(result.mask == value, truth == value))
        for name, value in labels.items():
            structure = truth == value
            begin = time.perf_counter()
            result = propagate(
                predictor, volume, Prompt.from_request({"roi": roi_3d(structure)}, volume.shape), propagation
            )
            seconds["prompted"] += time.perf_counter() - begin
            boxed[name].append(dice(result.mask, structure))

    def means(values: dict[str, list[float]]) -> dict[str, float]:
        return {n: round(float(np.mean(v)), 4) for n, v in values.items() if v}

    result = {"prompted": means(boxed), "auto": means(auto) or {n: 0.0 for n in labels}}
    for mode in ("prompted", "auto"):
        result[f"{mode}_mean"] = round(float(np.mean(list(result[mode].values()))), 4)
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    counts = [p["labelled"] for p in points]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(counts, [p["held_out"]["auto_mean"] for p in points], "o-", label="foundation_auto (no prompt)")
    axis.plot(counts, [p["held_out"]["prompted_mean"] for p in points], "s-", label="foundation (3D box)")
    axis.axhline(0.8, color="grey", linestyle=":", label="goal: automatic 0.80")
    axis.set_xlabel("labelled volumes")
    axis.set_ylabel("mean 3D Dice, 10 structures")
    axis.set_ylim(0, 1)
    axis.set_xticks(counts)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title(f"Held out {results['held_out'][0]}..{results['held_out'][-1]}; {results['device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_models(runs: dict[str, dict], path: Path) -> None:
    """The two paths to a medical foundation model side by side: one line per model and mode, Dice against the
    labelled volumes (zero-shot at 0; automatic mode starts after the first round, as a model has no head before).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for (name, results), colour in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        points = results["points"]
        counts = [p["labelled"] for p in points]
        axis.plot(counts, [p["held_out"]["prompted_mean"] for p in points], "s-", color=colour,
                  label=f"{name}: 3D box ({results['date']})")  # fmt: skip
        learned = [p for p in points if p["labelled"] > 0]
        axis.plot([p["labelled"] for p in learned], [p["held_out"]["auto_mean"] for p in learned], "o--",
                  color=colour, label=f"{name}: automatic")  # fmt: skip
    axis.set_xlabel("labelled volumes")
    axis.set_ylabel("mean 3D Dice on held-out volumes")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title("Continual learning: medical (LiteMedSAM) vs natural-image (MobileSAM) start", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(results: dict) -> str:
    lines = [
        f"# Continual learning on the sample data ({results['date']})",
        "",
        f"Model {results['model']} (encoder on {results.get('encoder', 'torch')}); "
        f"held out: {', '.join(results['held_out'])}; "
        f"{results['train']['steps']} steps a round. Mean 3D Dice over {len(results['labels'])} structures.",
        "",
        "| labelled volumes | version | served | automatic | box-prompted 3D | round wall time | of which embedding |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in results["points"]:
        r = p.get("round") or {}
        lines.append(
            f"| {p['labelled']} | {p['version']} | {'yes' if p.get('published', True) else 'no'} | "
            f"{p['held_out']['auto_mean']:.3f} | {p['held_out']['prompted_mean']:.3f} | "
            f"{r.get('round_seconds', 0):.0f} s | {r.get('prepare_seconds', 0):.0f} s |"
        )
    last = results["points"][-1]["held_out"]
    lines += ["", "Per structure after the last round (automatic / box-prompted):", ""]
    lines += [f"- {n}: {last['auto'][n]:.3f} / {last['prompted'][n]:.3f}" for n in results["labels"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/learning"))
    parser.add_argument("--counts", default="2,4,8", help="labelled volumes after each round")
    parser.add_argument("--held-out", default="sub-09,sub-10,sub-11,sub-12")
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="lite_medsam", help="a lib.model registry name, e.g. mobile_sam")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    labels = json.loads((args.data / "labels.json").read_text())
    held_out = args.held_out.split(",")
    counts = [int(c) for c in args.counts.split(",")]
    missing = [s for s in held_out + [f"sub-{max(counts):02d}"] if not (args.data / "studies" / f"{s}.nii.gz").exists()]
    if missing:
        raise SystemExit(f"missing sample volumes {missing}: build more with `make data` (12 subjects)")

    base = build_model(args.model, model_dir=args.out / "model", device=args.device)
    model_dir = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"  # fresh versions: never an earlier run's
    versions = VersionStore(model_dir, base.base_version)
    settings = AppSettings(model=args.model)
    # the server's encoder (OpenVINO float32 on a CPU): rounds and scores embed what a served round embeds
    predictor = SlicePredictor(
        base,
        EmbeddingCache(3 << 30),
        device=args.device,
        encoder_autocast=settings.encoder_bf16 if args.device == "cpu" else True,
        encoder_runtime=settings.encoder_runtime,
        ir_dir=args.out / "model" / "openvino",
        mask_threshold=settings.decoder_threshold,
    )
    volumes = VolumeStore(IntensityConfig(), capacity=16)
    # embeddings are keyed by encoder and volume content, so later runs reuse them (the encoder is frozen)
    embeddings = EmbeddingStore.for_model(args.out / "embeddings", base, predictor.encode_pixels)
    config = RoundConfig(train=TrainConfig(steps=args.steps))
    results = {
        "date": time.strftime("%Y-%m-%d"), "model": base.version, "encoder": predictor.encoder().name,
        "labels": list(labels), "held_out": held_out,
        "train": {"steps": args.steps}, "device": args.device, "points": [],
    }  # fmt: skip
    begin = time.perf_counter()
    logger.info("zero-shot on held-out volumes (encodes them once)")
    results["points"].append(
        {"labelled": 0, "version": 0, "held_out": held_out_scores(predictor, volumes, args.data, held_out, labels)}
    )
    logger.info("0 labelled: %s", {k: v for k, v in results["points"][-1]["held_out"].items() if "mean" in k})
    served = base
    for count in counts:
        images = [
            LabelledImage(f"sub-{i:02d}", str(args.data / "studies" / f"sub-{i:02d}.nii.gz"),
                          str(args.data / "ground-truth" / f"sub-{i:02d}.nii.gz"), 1.0)
            for i in range(1, count + 1)
        ]  # fmt: skip
        round_report = run_round(served, images, labels, versions, embeddings, volumes, config)
        number = versions.served()
        served = base.with_version(number, versions.load_state(number), versions.meta(number))
        predictor.use_model(served)
        scores = held_out_scores(predictor, volumes, args.data, held_out, labels)
        metrics = round_report.metrics
        results["points"].append({
            "labelled": count, "version": round_report.version, "published": round_report.published,
            "reason": round_report.reason, "held_out": scores,
            "round": {k: metrics[k] for k in ("round_seconds", "prepare_seconds", "train_seconds", "steps")},
            "validation": metrics["validation"], "earlier_labels": metrics["earlier_labels"],
        })  # fmt: skip
        logger.info(
            "%d labelled: automatic %.3f, prompted %.3f, round %.0f s",
            count,
            scores["auto_mean"],
            scores["prompted_mean"],
            metrics["round_seconds"],
        )
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["total_seconds"] = round(time.perf_counter() - begin, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "report.md").write_text(report(results))
    plot(results, args.out / "learning_curve.png")
    print(report(results))


if __name__ == "__main__":
    main()
