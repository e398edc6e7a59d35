"""Active learning: Dice on held-out volumes against the number of labelled volumes, for each strategy.

    python -m lib.evaluation.bench_active --data sample-data/build --out bench-results/active

A simulated annotation loop (the annotator is the ground-truth label): each strategy picks volumes from the
pool (default sub-01..08 + sub-13..16) one at a time, exactly as the server's strategies pick them
(lib.engine.selection on lib.engine.uncertainty's scores), and after every `--counts` step a continual round
runs as the `foundation` trainer runs it (lib.engine.continual.run_round, starting from the version served
so far). The served version's `foundation_auto` engine then segments the held-out volumes (sub-09..12,
never picked) and its mean 3D Dice over the ten structures is the curve's point. `random` runs with several
seeds; the goal is for `uncertain` or `diverse` to reach random's Dice at 8 labels with at most 6.
Writes results.json, report.md and active_learning.png. Rounds use `--steps` optimiser steps (default 160,
fewer than the product's 400; the whole comparison took 77 min on 2 CPU cores on 2026-12-01, 2.5 h on 2026-11-28).
`--report-only` rewrites report and plot from a (possibly stopped) run's results.json; `--time-scoring`
times scoring alone with the last `uncertain` run's version.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.auto import auto_segment
from lib.engine.cache import EmbeddingCache
from lib.engine.continual import LabelledImage, RoundConfig, run_round
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.selection import pick_diverse, pick_uncertain
from lib.engine.training import TrainConfig
from lib.engine.uncertainty import ScoreConfig, VolumeScore, cold_start_scores, default_views, score_volume, view_stores
from lib.engine.volumes import VolumeStore
from lib.evaluation.ground_truth import dice
from lib.model import LoadedModel, build_model
from lib.model.versions import VersionStore
from lib.settings import AppSettings

logger = logging.getLogger("bench-active")
DEFAULT_POOL = ",".join(f"sub-{i:02d}" for i in (*range(1, 9), *range(13, 17)))


class Bench:
    """What every run shares: the base model, encoded volumes, cached embeddings and base-model scores."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.labels = json.loads((args.data / "labels.json").read_text())
        self.base = build_model("lite_medsam", model_dir=args.out / "model", device=args.device)
        self.predictor = SlicePredictor(
            self.base, EmbeddingCache(3 << 30), device=args.device, encoder_autocast=True,
            mask_threshold=AppSettings().decoder_threshold,
        )  # fmt: skip
        self.volumes = VolumeStore(IntensityConfig(), capacity=24)
        self.score_config = ScoreConfig(slices=args.score_slices)
        network = self.base.network
        self.views = default_views(self.score_config, network.image_size, network.mask_input_size[0])
        # embeddings are keyed by encoder and volume content: every run (and a later rerun) reuses them
        self.stores = view_stores(
            args.out / "embeddings", self.base.encoder_version, self.predictor.encode_pixels, network.image_size,
            network.mask_input_size[0], self.views,
        )  # fmt: skip
        self.scores: dict[tuple[str, str], VolumeScore] = {}
        self.score_seconds: dict[str, list[float]] = {"first": [], "again": []}

    def image(self, subject: str) -> LabelledImage:
        data = self.args.data
        return LabelledImage(
            subject, str(data / "studies" / f"{subject}.nii.gz"), str(data / "ground-truth" / f"{subject}.nii.gz"), 1.0
        )

    def score(self, model: LoadedModel, run: str, subject: str, previous: LoadedModel | None) -> VolumeScore:
        key = (run if model.number else "base", f"{subject}@{model.number}")
        if key not in self.scores:
            encoded = sum(s.encoded_slices for s in self.stores.values())
            volume = self.volumes.get(self.image(subject).image_path)
            threshold = model.mask_threshold if model.mask_threshold is not None else AppSettings().decoder_threshold
            config = ScoreConfig(slices=self.args.score_slices, mask_threshold=threshold)
            result = score_volume(model, volume, self.stores, self.views, config, previous)
            fresh = sum(s.encoded_slices for s in self.stores.values()) > encoded
            if model.auto_head is not None:
                self.score_seconds["first" if fresh else "again"].append(result.seconds)
            self.scores[key] = result
        return self.scores[key]

    def held_out(self, model: LoadedModel) -> dict:
        self.predictor.use_model(model)
        per_label: dict[str, list[float]] = {n: [] for n in self.labels}
        for subject in self.args.held_out.split(","):
            truth = np.asarray(nib.load(self.args.data / "ground-truth" / f"{subject}.nii.gz").dataobj)
            result = auto_segment(self.predictor, self.volumes.get(self.image(subject).image_path), self.labels)
            for name, value in self.labels.items():
                per_label[name].append(dice(result.mask == value, truth == value))
        means = {n: round(float(np.mean(v)), 4) for n, v in per_label.items()}
        return {"auto": means, "auto_mean": round(float(np.mean(list(means.values()))), 4)}

    def pick(
        self, strategy: str, rng: random.Random, served: LoadedModel, run: str, labelled: list[str],
        previous: LoadedModel | None,
    ) -> tuple[str, dict]:  # fmt: skip
        pool = self.args.pool.split(",")
        candidates = [s for s in pool if s not in labelled]
        if strategy == "random":
            return rng.choice(candidates), {}
        results = {s: self.score(served, run, s, previous) for s in pool}
        descriptors = {s: r.descriptor for s, r in results.items()}
        if served.auto_head is None:
            scores = {s: v["score"] for s, v in cold_start_scores(descriptors, set(labelled)).items()}
        else:
            scores = {s: results[s].score for s in candidates}
        if strategy == "uncertain":
            chosen = pick_uncertain(candidates, scores, rng)
            return chosen, {"score": scores[chosen]}
        chosen, why = pick_diverse(candidates, scores, descriptors, [descriptors[s] for s in labelled], rng)
        return chosen, why

    def run(self, strategy: str, seed: int, counts: list[int], stamp: str) -> list[dict]:
        run = f"{strategy}-{seed}"
        versions = VersionStore(self.args.out / f"run-{stamp}" / run, self.base.base_version)
        rng = random.Random(seed)
        served, previous, labelled, points = self.base, None, [], []
        config = RoundConfig(train=TrainConfig(steps=self.args.steps))
        for count in counts:
            picks = []
            while len(labelled) < count:
                chosen, why = self.pick(strategy, rng, served, run, labelled, previous)
                labelled.append(chosen)
                picks.append({"image": chosen, **why})
            logger.info("%s: labelled %s; training", run, labelled)
            images = [self.image(s) for s in labelled]
            report = run_round(served, images, self.labels, versions, self.stores["identity"], self.volumes, config)
            number = versions.served()
            if number != served.number:
                previous = served if served.auto_head is not None else None
                served = self.base.with_version(number, versions.load_state(number), versions.meta(number))
            scores = self.held_out(served)
            points.append({
                "labelled": count, "picked": picks, "version": report.version, "published": report.published,
                "held_out": scores, "round_seconds": report.metrics["round_seconds"],
            })  # fmt: skip
            logger.info("%s: %d labelled -> held-out automatic Dice %.3f", run, count, scores["auto_mean"])
        return points


def summarise(results: dict) -> dict:
    """Random's Dice at its largest count (mean over seeds), and how few labels each strategy needs for it."""
    random_runs = [r for name, r in results["runs"].items() if name.startswith("random")]
    if not random_runs:
        return {"random_count": None, "random_dice": None, "labels_needed": {}}
    top = max(p["labelled"] for p in random_runs[0])
    target = float(np.mean([next(p for p in r if p["labelled"] == top)["held_out"]["auto_mean"] for r in random_runs]))
    summary = {"random_count": top, "random_dice": round(target, 4), "labels_needed": {}}
    for name, points in results["runs"].items():
        if name.startswith("random"):
            continue
        reached = [p["labelled"] for p in points if p["held_out"]["auto_mean"] >= target]
        summary["labels_needed"][name.rsplit("-", 1)[0]] = min(reached) if reached else None
    return summary


def curves(results: dict) -> dict[str, dict[int, list[float]]]:
    """{strategy: {labelled: [Dice of each seed]}}."""
    out: dict[str, dict[int, list[float]]] = {}
    for name, points in results["runs"].items():
        strategy = name.rsplit("-", 1)[0]
        for p in points:
            out.setdefault(strategy, {}).setdefault(p["labelled"], []).append(p["held_out"]["auto_mean"])
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for strategy, points in curves(results).items():
        counts = sorted(points)
        mean = [float(np.mean(points[c])) for c in counts]
        line = axis.plot(counts, mean, "o-", label=f"{strategy} ({len(points[counts[0]])} seed(s))")[0]
        if len(points[counts[0]]) > 1:
            low = [min(points[c]) for c in counts]
            high = [max(points[c]) for c in counts]
            axis.fill_between(counts, low, high, color=line.get_color(), alpha=0.2, label=f"{strategy}: min-max")
    summary = results["summary"]
    if summary["random_dice"] is not None:
        axis.axhline(summary["random_dice"], color="grey", linestyle=":", label=f"random at {summary['random_count']}")
    axis.set_xlabel("labelled volumes")
    axis.set_ylabel("held-out automatic 3D Dice (10 structures)")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(f"Active learning on the sample data ({results['train_steps']} steps a round)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(results: dict) -> str:
    table = curves(results)
    counts = sorted({c for points in table.values() for c in points})
    lines = [
        f"# Active learning on the sample data ({results['date']}, {results['device']})",
        "",
        f"Pool {results['pool'][0]}..{results['pool'][-1]} ({len(results['pool'])} volumes), held out "
        f"{', '.join(results['held_out'])}; {results['train_steps']} steps a round. Held-out automatic 3D Dice "
        "(mean over 10 structures; random: mean of its seeds, min-max in brackets).",
        "",
        "| strategy | " + " | ".join(f"{c} labelled" for c in counts) + " |",
        "| --- | " + " | ".join("---" for _ in counts) + " |",
    ]
    for strategy, points in table.items():
        cells = []
        for c in counts:
            values = points.get(c)
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    summary = results["summary"]
    if summary["random_dice"] is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"Random reaches {summary['random_dice']:.3f} with {summary['random_count']} labelled volumes."]
    for name, needed in summary["labels_needed"].items():
        lines.append(f"- {name}: " + (f"reaches it with {needed}" if needed else "does not reach it in this run"))
    timing = results["scoring_seconds"]
    if timing["first_mean"] is None:
        lines += ["", "Scoring was not timed in this run (`--time-scoring` times it alone)."]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Scoring wall time per volume: {timing['first_mean']} s the first time (encoding "
        f"{results['score_slices']} x 2 slices plain + 2 perturbed views), {timing['again_mean']} s with a new "
        "model version (embeddings cached).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/active"))
    parser.add_argument("--pool", default=DEFAULT_POOL)
    parser.add_argument("--held-out", default="sub-09,sub-10,sub-11,sub-12")
    parser.add_argument("--strategies", default="uncertain,diverse,random")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the random strategy")
    parser.add_argument("--counts", default="2,4,6", help="labelled volumes after each round (uncertain, diverse)")
    parser.add_argument("--random-counts", default="2,4,6,8", help="the same for random")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--score-slices", type=int, default=ScoreConfig().slices)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report-only", action="store_true", help="rewrite report and plot from results.json")
    parser.add_argument(
        "--append", action="store_true",
        help="keep the runs already in results.json and add only the planned runs it lacks (same data and pool)",
    )  # fmt: skip
    parser.add_argument(
        "--time-scoring", action="store_true",
        help="time scoring alone (fresh embedding folder, the last uncertain run's version) into results.json",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only or args.time_scoring:
        results = json.loads((args.out / "results.json").read_text())
        if args.time_scoring:
            results["score_seconds"] = time_scoring(args)
        finish(results, args.out)
        return
    needed = args.pool.split(",") + args.held_out.split(",")
    missing = [s for s in needed if not (args.data / "studies" / f"{s}.nii.gz").exists()]
    if missing:
        raise SystemExit(f"missing sample volumes {missing}: build them with `make data` (16 subjects)")
    bench = Bench(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {
        "date": time.strftime("%Y-%m-%d"), "device": args.device, "pool": args.pool.split(","),
        "held_out": args.held_out.split(","), "train_steps": args.steps, "score_slices": args.score_slices,
        "runs": {},
    }  # fmt: skip
    if args.append:
        results = appendable(args.out / "results.json", results)
    results.setdefault("run_dates", {})
    begin = time.perf_counter()
    plan = []
    for strategy in args.strategies.split(","):
        if strategy == "random":
            counts = [int(c) for c in args.random_counts.split(",")]
            plan += [(strategy, int(seed), counts) for seed in args.seeds.split(",")]
        else:
            plan.append((strategy, 0, [int(c) for c in args.counts.split(",")]))
    for strategy, seed, counts in plan:
        if f"{strategy}-{seed}" in results["runs"]:
            logger.info("%s-%d: already in results.json, kept", strategy, seed)
            continue
        results["runs"][f"{strategy}-{seed}"] = bench.run(strategy, seed, counts, stamp)
        results["run_dates"][f"{strategy}-{seed}"] = stamp
        if not args.append or bench.score_seconds["first"]:
            results["score_seconds"] = bench.score_seconds
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["total_seconds" if not args.append else "appended_seconds"] = round(time.perf_counter() - begin, 1)
    finish(results, args.out)


def appendable(path: Path, fresh: dict) -> dict:
    """The earlier results, if they were made with the same pool, held-out set, steps and slices: a run added
    to results made another way would not be comparable."""
    if not path.exists():
        return fresh
    earlier = json.loads(path.read_text())
    earlier.setdefault("run_dates", {name: earlier["date"] for name in earlier["runs"]})
    differs = [k for k in ("pool", "held_out", "train_steps", "score_slices", "device") if earlier.get(k) != fresh[k]]
    if differs:
        raise SystemExit(f"--append: {path} was made with other {', '.join(differs)}; rerun without --append")
    return earlier


def time_scoring(args: argparse.Namespace, subjects: tuple[str, ...] = ("sub-13", "sub-14", "sub-15")) -> dict:
    """Seconds to score each volume with the newest `uncertain` run's served version: first with nothing
    encoded (a fresh embedding folder), then again (a new version: every embedding cached)."""
    import tempfile

    runs = sorted(args.out.glob("run-*/uncertain-0"))
    if not runs:
        raise SystemExit("no uncertain run in --out yet: run the benchmark first")
    with tempfile.TemporaryDirectory() as scratch:
        args.out, out = Path(scratch), args.out  # a fresh embedding folder: nothing cached
        bench = Bench(args)
        args.out = out
        versions = VersionStore(runs[-1], bench.base.base_version)
        number = versions.served()
        model = bench.base.with_version(number, versions.load_state(number), versions.meta(number))
        for subject in subjects:
            bench.score(model, "timing", subject, None)
            bench.scores.clear()
            bench.score(model, "timing", subject, None)
    logger.info("scoring seconds: %s", bench.score_seconds)
    return bench.score_seconds


def finish(results: dict, out: Path) -> None:
    """Summary, report and plot from the runs so far (a stopped benchmark's results.json works too)."""
    timing = results.get("score_seconds") or {"first": [], "again": []}
    results["scoring_seconds"] = {
        "first_mean": round(float(np.mean(timing["first"])), 1) if timing["first"] else None,
        "again_mean": round(float(np.mean(timing["again"])), 1) if timing["again"] else None,
        "first": [round(t, 1) for t in timing["first"]],
        "again": [round(t, 1) for t in timing["again"]],
    }
    results["summary"] = summarise(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report(results))
    plot(results, out / "active_learning.png")
    print(report(results))


if __name__ == "__main__":
    main()
