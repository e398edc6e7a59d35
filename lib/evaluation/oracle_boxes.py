"""The ceiling for box-prompted 3D: the model given the ground truth's own tight box on every slice.

    python -m lib.evaluation.oracle_boxes --data sample-data/build --subjects sub-01,sub-03

No propagation can beat it (it knows every slice's box), so it tells how much of a 3D Dice gap is the
propagation's and how much is the model's on this data. Engine only, whole slices, the server's defaults
(float32 encoder, the model's mask threshold).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.cache import EmbeddingCache
from lib.engine.interactive import bounding_box
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.volumes import VolumeStore
from lib.evaluation.ground_truth import dice
from lib.model import build_model


def oracle_dice(predictor: SlicePredictor, volume, truth: np.ndarray) -> float:
    prediction = np.zeros_like(truth)
    for z in np.nonzero(truth.any(axis=(0, 1)))[0]:
        box = bounding_box(truth[:, :, z].T)
        prediction[:, :, z] = predictor.predict(volume, int(z), None, None, box).mask.T
    return dice(prediction, truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--subjects", default="sub-01,sub-03")
    args = parser.parse_args()
    labels = json.loads((args.data / "labels.json").read_text())
    model = build_model("lite_medsam")
    predictor = SlicePredictor(
        model, EmbeddingCache(4 << 30), encoder_runtime="auto", mask_threshold=model.spec.mask_threshold
    )
    store = VolumeStore(IntensityConfig())
    scores: dict[str, list[float]] = {name: [] for name in labels}
    for subject in args.subjects.split(","):
        volume = store.get(args.data / "studies" / f"{subject}.nii.gz")
        truth = np.asarray(nib.load(args.data / "ground-truth" / f"{subject}.nii.gz").dataobj)
        for name, index in labels.items():
            scores[name].append(oracle_dice(predictor, volume, truth == index))
            print(f"{subject} {name}: oracle 3D Dice {scores[name][-1]:.3f}", flush=True)
    means = {name: float(np.mean(v)) for name, v in scores.items()}
    print(json.dumps({k: round(v, 3) for k, v in means.items()}))
    print(f"mean oracle 3D Dice over structures: {np.mean(list(means.values())):.3f}")


if __name__ == "__main__":
    main()
