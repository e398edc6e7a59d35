"""Calibrate the mask logit threshold on studies that the benchmark does not score.

    python -m lib.evaluation.calibrate_threshold --data sample-data/build --subjects sub-04,sub-05

SAM-family decoders are trained with a 0 logit threshold, but a model can be biased on a new domain (LiteMedSAM
under-segments these deep grey nuclei). The threshold is chosen here on held-out studies (`make bench` scores
sub-01..sub-03 and times sub-06), for 2D (box in a focus window) and 3D (propagation), and set in the app's
default `mask_threshold`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.cache import EmbeddingCache
from lib.engine.interactive import PropagationConfig, propagate, segment_2d
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.prompts import Prompt
from lib.engine.volumes import VolumeStore
from lib.evaluation.ground_truth import box_on_slice, dice, middle_slice, roi_3d
from lib.model import build_model

THRESHOLDS = (-2.0, -1.5, -1.0, -0.5, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--subjects", default="sub-04,sub-05")
    parser.add_argument("--context", type=float, default=3.0)
    args = parser.parse_args()
    labels = json.loads((args.data / "labels.json").read_text())
    predictor = SlicePredictor(build_model("lite_medsam"), EmbeddingCache(6 << 30), encoder_autocast=True)
    store = VolumeStore(IntensityConfig())
    scores: dict[tuple[str, float], list[float]] = {}
    for subject in args.subjects.split(","):
        volume = store.get(args.data / "studies" / f"{subject}.nii.gz")
        truth_all = np.asarray(nib.load(args.data / "ground-truth" / f"{subject}.nii.gz").dataobj)
        for name, index in labels.items():
            truth = truth_all == index
            z = middle_slice(truth)
            for threshold in THRESHOLDS:
                predictor.mask_threshold = threshold
                flat = segment_2d(
                    predictor, volume, Prompt.from_request({"roi": box_on_slice(truth, z)}, volume.shape), args.context
                )
                scores.setdefault(("2d", threshold), []).append(dice(flat.mask[:, :, z], truth[:, :, z]))
                deep = propagate(
                    predictor,
                    volume,
                    Prompt.from_request({"roi": roi_3d(truth)}, volume.shape),
                    PropagationConfig(first_context=args.context),
                )
                scores.setdefault(("3d", threshold), []).append(dice(deep.mask, truth))
            print(subject, name, {f"{k[0]}@{k[1]:g}": round(v[-1], 3) for k, v in scores.items()}, flush=True)
    for mode in ("2d", "3d"):
        means = {t: float(np.mean(scores[(mode, t)])) for t in THRESHOLDS}
        best = max(means, key=means.get)
        print(f"{mode}: " + ", ".join(f"{t:g} -> {m:.3f}" for t, m in means.items()) + f"; best {best:g}")


if __name__ == "__main__":
    main()
