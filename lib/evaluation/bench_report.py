"""Gathers every benchmark's output in bench-results/ into one results.json and one report.md.

    python -m lib.evaluation.bench_report --out bench-results

`make bench` runs the stages (serving, interactive, learning, baseline, speed) and then this. Each section
keeps the file it came from and that file's date, so a section left from an earlier or longer run
(`make bench-active`, `make bench-learning`, `make bench-load`) is shown as such, never passed off as new.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from lib.evaluation import bench_active, bench_baseline, bench_interactive, bench_learning, bench_serving, bench_speed

# Published figures of other medical foundation models, on their own data (not comparable one to one).
ANCHORS = [
    ("SAM-Med2D (paper, SA-Med2D-16M test set)", "2D Dice 0.793 with a box, 0.787 with 5 points"),
    ("SAM-Med3D-turbo (paper)", "3D Dice 0.763 with 1 point, 0.807 with 10 points"),
    ("MONAI Label 0.8.5 `sam_2d` / `sam_3d` (this machine, DESIGN.md)", "2.0-3.7 s per click; 63 s for 32 slices"),
]


LEARNING_SECTIONS = ("continual_learning", "continual_learning_mobile_sam")


def _load_report(results: dict) -> str:
    from lib.evaluation.bench_load import report

    return report(results, results["meta"])


def newest(paths: list[Path]) -> Path | None:
    existing = [p for p in paths if p.exists()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def sections(out: Path) -> list[tuple[str, list[Path], Callable[[dict], str], str]]:
    """(name, candidate files, report function, command that produces it)."""
    return [
        ("serving", [out / "serving.json"], bench_serving.report, "make bench"),
        ("interactive", [out / "interactive.json"], bench_interactive.report, "make bench"),
        ("active_learning", [out / "active" / "results.json"], bench_active.report, "make bench-active"),
        ("continual_learning", [out / "learning" / "results.json"], bench_learning.report, "make bench-learning"),
        (
            "continual_learning_mobile_sam", [out / "learning-mobile_sam" / "results.json"], bench_learning.report,
            "make bench-learning",
        ),
        ("baseline", [out / "baseline" / "results.json"], bench_baseline.report, "make bench"),
        ("speed", [out / "speed.json"], bench_speed.report, "make bench"),
        ("load", [out / "load.json"], _load_report, "make bench-load"),
    ]  # fmt: skip


def gather(out: Path) -> tuple[dict, str]:
    results: dict = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}, "missing": {}}
    body: list[str] = []
    for name, candidates, render, command in sections(out):
        path = newest(candidates)
        if path is None:
            results["missing"][name] = command
            continue
        data = json.loads(path.read_text())
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        results["sections"][name] = {"source": str(path.relative_to(out)), "written": written, "results": data}
        body += [f"<!-- {name}: {path.relative_to(out)}, written {written} -->", render(data), ""]
    learning = [results["sections"][n]["results"] for n in LEARNING_SECTIONS if n in results["sections"]]
    if len(learning) > 1:  # both paths to a medical model measured: one plot side by side
        bench_learning.plot_models({r["model"].split("@")[0]: r for r in learning}, out / "learning_models.png")
    plots = sorted(p.name for p in out.rglob("*.png") if p.parent == out or p.parent.name in ("active", "learning"))
    lines = [
        f"# medfoundation benchmark ({results['generated']})",
        "",
        "| section | from | written |",
        "| --- | --- | --- |",
    ]
    for name, section in results["sections"].items():
        lines.append(f"| {name} | `{section['source']}` | {section['written']} |")
    for name, command in results["missing"].items():
        lines.append(f"| {name} | not run (`{command}`) | |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots) if plots else "No plots.", ""]
    lines += body
    lines += ["## Anchors (published or measured elsewhere; different data, not comparable one to one)", ""]
    lines += [f"- {who}: {what}" for who, what in ANCHORS]
    results["anchors"] = dict(ANCHORS)
    return results, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    results, text = gather(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
