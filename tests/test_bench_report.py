"""The benchmark report: both paths to a medical model (LiteMedSAM, MobileSAM) side by side.

The learning results are written here in bench_learning's format, with made-up Dice values: the test checks the
report's gathering and rendering, not any measured figure (those come from `make bench-learning`).
"""

import json
import subprocess
import sys
from pathlib import Path

from lib.evaluation.bench_report import gather
from lib.evaluation.server import REPO

LABELS = ["left_thalamus", "right_thalamus"]


def learning_results(model: str, dice_by_count: dict[int, float]) -> dict:
    points = []
    for count, value in dice_by_count.items():
        scores = {n: value for n in LABELS}
        held_out = {"prompted": scores, "auto": scores, "prompted_mean": value, "auto_mean": value if count else 0.0}
        point = {"labelled": count, "version": count // 2, "held_out": held_out}
        if count:
            point["round"] = {"round_seconds": 100.0, "prepare_seconds": 10.0, "train_seconds": 90.0, "steps": 40}
        points.append(point)
    return {
        "date": "2026-11-30", "model": f"{model}@0123456789ab", "encoder": "openvino-f32", "labels": LABELS,
        "held_out": ["sub-09", "sub-10"], "train": {"steps": 40}, "device": "cpu", "points": points,
    }  # fmt: skip


def test_the_report_shows_both_models_learning_and_plots_them_side_by_side(tmp_path: Path):
    for folder, model, values in (
        ("learning", "lite_medsam", {0: 0.59, 2: 0.67, 4: 0.70}),
        ("learning-mobile_sam", "mobile_sam", {0: 0.52, 2: 0.61, 4: 0.66}),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(learning_results(model, values)))
    results, text = gather(tmp_path)
    assert {"continual_learning", "continual_learning_mobile_sam"} <= set(results["sections"])
    assert "lite_medsam@0123456789ab (encoder on openvino-f32)" in text
    assert "mobile_sam@0123456789ab (encoder on openvino-f32)" in text
    assert "| 4 | 2 | yes | 0.660 | 0.660 | 100 s | 10 s |" in text  # MobileSAM's last round, as rendered
    plot = tmp_path / "learning_models.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "`learning_models.png`" in text


def test_one_model_alone_gets_its_section_and_no_side_by_side_plot(tmp_path: Path):
    (tmp_path / "learning").mkdir()
    (tmp_path / "learning" / "results.json").write_text(json.dumps(learning_results("lite_medsam", {0: 0.5, 2: 0.6})))
    results, _ = gather(tmp_path)
    assert "continual_learning" in results["sections"]
    assert results["missing"]["continual_learning_mobile_sam"] == "make bench-learning"
    assert not (tmp_path / "learning_models.png").exists()


def test_the_baseline_finds_monai_labels_radiology_app_in_the_venv():
    # `make venv` installs with uv, which leaves the wheel's sample apps under site-packages instead of the venv's
    # root where pip puts them: the baseline of `make bench` once failed there before training anything
    from lib.evaluation.bench_baseline import radiology_app

    app = radiology_app()
    assert (app / "main.py").is_file() and (app / "lib" / "configs" / "segmentation.py").is_file()


def test_a_benchmarks_scratch_folders_are_gone_when_it_exits():
    # copies of studies, 50 MB model folders, client downloads: on 2026-12-01 this machine held 71 such folders
    # left by earlier benchmark runs
    script = (
        "from lib.atomic import scratch_dir\n"
        "folder = scratch_dir('bench-test-'); (folder / 'model').mkdir(); (folder / 'model' / 'w').write_bytes(b'x')\n"
        "print(folder)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    folder = Path(done.stdout.strip())
    assert folder.name.startswith("bench-test-") and not folder.exists()
