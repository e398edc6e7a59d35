"""The baseline: MONAI Label's own radiology `segmentation` model, trained from scratch on the same labels.

    python -m lib.evaluation.bench_baseline --data sample-data/build --out bench-results/baseline --minutes 10

The sample radiology app that ships with MONAI Label (`radiology_app()` finds it in the venv; copied to a
fresh folder so no earlier model is used) is started with `--conf models segmentation`, our ten labels and
no pre-trained weights. The training volumes of the continual-learning benchmark's 8-volume round (same
split: lib.engine.continual.split_by_volume) are saved as final labels through MONAILabelClient, its trainer
runs for the given wall time, and its infer task segments the same held-out volumes; 3D Dice per label.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monailabel.client import MONAILabelClient

from lib.engine.continual import LabelledImage, split_by_volume
from lib.evaluation.ground_truth import dice
from lib.evaluation.server import ServerProcess


def radiology_app() -> Path:
    """The radiology sample app shipped in MONAI Label's wheel as data files.

    pip moves them to `<venv>/monailabel/sample-apps`; uv (what `make venv` uses) leaves them in
    `site-packages/monailabel-<version>-<build>.data/data/monailabel/sample-apps` (the wheel's `.data` folder
    carries a build tag its `.dist-info` lacks).
    """
    import monailabel

    site = Path(monailabel.__file__).resolve().parent.parent
    candidates = [Path(sys.prefix) / "monailabel", *sorted(site.glob("monailabel-*.data/data/monailabel"))]
    for root in candidates:
        if (root / "sample-apps" / "radiology" / "main.py").is_file():
            return root / "sample-apps" / "radiology"
    raise SystemExit(
        "MONAI Label's radiology sample app was not found; looked in: " + ", ".join(str(c) for c in candidates)
    )


def report(results: dict) -> str:
    """The baseline's section of the benchmark report."""
    lines = [
        f"## Baseline: MONAI Label's radiology `segmentation`, from scratch ({results['date']})",
        "",
        f"Trained through MONAI Label on {', '.join(results['train'])} for {results['train_seconds']:.0f} s, "
        f"scored on {', '.join(results['held_out'])}: mean 3D Dice **{results['dice_mean']:.3f}** over "
        f"{len(results['dice'])} structures, {results['infer_seconds_per_volume']} s a volume to infer.",
        "MONAI Label's click model, DeepEdit, is not run: the radiology app's DeepEdit hard-codes seven abdominal",
        "CT labels (spleen to inferior vena cava; `--conf labels` is not read), windows every image at -175..250 HU",
        "and downloads its pre-trained weights at start (offline here). On these MR brain labels it would need its",
        "config, trainer and infer task rewritten, and would no longer be MONAI Label's model.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/baseline"))
    parser.add_argument("--labelled", type=int, default=8)
    parser.add_argument("--held-out", default="sub-09,sub-10,sub-11,sub-12")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time before it is stopped")
    parser.add_argument("--quick", action="store_true", help="2 labelled volumes, 1 minute, 1 held-out volume")
    args = parser.parse_args()
    if args.quick:
        args.labelled, args.held_out, args.minutes = 2, "sub-09", 1.0
    labels = json.loads((args.data / "labels.json").read_text())
    if list(labels.values()) != list(range(1, len(labels) + 1)):
        raise SystemExit("the radiology app numbers labels 1..n in the order given; labels.json must too")
    images = [LabelledImage(f"sub-{i:02d}", "", "") for i in range(1, args.labelled + 1)]
    train, _ = split_by_volume(images, 0.25)
    held_out = args.held_out.split(",")

    shutil.rmtree(args.out, ignore_errors=True)
    app, studies = args.out / "radiology", args.out / "studies"
    shutil.copytree(radiology_app(), app, ignore=shutil.ignore_patterns("__pycache__", "model", "logs"))
    studies.mkdir(parents=True)
    for subject in [i.image_id for i in train] + held_out:
        shutil.copy(args.data / "studies" / f"{subject}.nii.gz", studies)
    # no SAM2 task: it downloads its weights at start, which fails offline
    conf = {"models": "segmentation", "labels": ",".join(labels), "use_pretrained_model": "false", "sam2": "false"}
    result: dict = {"date": time.strftime("%Y-%m-%d"), "train": [i.image_id for i in train], "held_out": held_out}
    with ServerProcess(studies, args.out / "server.log", conf, app=app) as server:
        client = MONAILabelClient(server.url, tmpdir=str(args.out))
        for image in train:
            client.save_label(image.image_id, str(args.data / "ground-truth" / f"{image.image_id}.nii.gz"), "final")
        begin = time.time()
        # MONAI Label tracks to an MLflow file store by default, which MLflow 3 refuses: the round dies at start
        params = {"max_epochs": 1000, "val_split": 0.0, "train_batch_size": 1, "tracking": "None"}
        client.train_start("segmentation", params)
        while time.time() - begin < args.minutes * 60:
            status = client.train_status()
            if status.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
            time.sleep(10)
        client.train_stop()
        result["train_seconds"] = round(time.time() - begin, 1)
        details = client.train_status().get("details", [])
        result["last_log_lines"] = details[-5:]
        models = sorted(str(p.relative_to(app)) for p in (app / "model").rglob("*.pt"))
        result["model_files"] = models
        if not models:
            raise SystemExit("the radiology trainer saved no model:\n" + "\n".join(details))
        scores: dict[str, list[float]] = {name: [] for name in labels}
        infer_seconds = []
        for subject in held_out:
            start = time.time()
            path, _ = client.infer("segmentation", subject, {})
            infer_seconds.append(time.time() - start)
            predicted = np.asarray(nib.load(path).dataobj)
            truth = np.asarray(nib.load(args.data / "ground-truth" / f"{subject}.nii.gz").dataobj)
            for name, value in labels.items():
                scores[name].append(dice(predicted == value, truth == value))
    result["dice"] = {n: round(float(np.mean(v)), 4) for n, v in scores.items()}
    result["dice_mean"] = round(float(np.mean(list(result["dice"].values()))), 4)
    result["infer_seconds_per_volume"] = round(float(np.mean(infer_seconds)), 1)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))


if __name__ == "__main__":
    main()
