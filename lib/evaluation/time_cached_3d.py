"""Seconds of a 3D request whose slices were all decoded before (a click after a box), engine only, no HTTP.

    python -m lib.evaluation.time_cached_3d --data sample-data/build --subject sub-01

Each structure gets the CVPR 2025 challenge's box prompt (tight box on its middle slice + z-range); one
`propagate` warms the embedding cache and the predictor's remembered decodes, then the same prompt, and the
prompt with a click at the structure's middle, are timed `--repeat` times each. What is left is the
propagation's own work (boxes, cuts, the 3D smoothing), which every click of a 3D session pays.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.cache import EmbeddingCache
from lib.engine.interactive import propagate
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.prompts import Prompt
from lib.engine.volumes import VolumeStore
from lib.evaluation.ground_truth import centre_click, middle_slice, roi_3d
from lib.model import build_model
from lib.settings import AppSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--subject", default="sub-01")
    parser.add_argument("--structures", default="left_thalamus,left_hippocampus,right_pallidum")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    labels = json.loads((args.data / "labels.json").read_text())
    settings = AppSettings()
    predictor = SlicePredictor(
        build_model(settings.model), EmbeddingCache(8 << 30), encoder_runtime=settings.encoder_runtime,
        mask_threshold=settings.decoder_threshold,
    )  # fmt: skip
    config = settings.propagation_config()
    volume = VolumeStore(IntensityConfig()).get(args.data / "studies" / f"{args.subject}.nii.gz")
    truth = np.asarray(nib.load(args.data / "ground-truth" / f"{args.subject}.nii.gz").dataobj)
    for name in args.structures.split(","):
        structure = truth == labels[name]
        z = middle_slice(structure)
        box = {"roi": roi_3d(structure), "slice": z}
        x, y = centre_click(structure[:, :, z])
        requests = {"box": box, "box + click": {**box, "foreground": [[int(x), int(y), z]]}}
        propagate(predictor, volume, Prompt.from_request(box, volume.shape), config)  # encodes and decodes
        timings = {}
        for label, request in requests.items():
            seconds = []
            for _ in range(args.repeat):
                begin = time.perf_counter()
                propagate(predictor, volume, Prompt.from_request(request, volume.shape), config)
                seconds.append(time.perf_counter() - begin)
            timings[label] = [round(1000 * s) for s in seconds]
        print(json.dumps({"structure": name, "ms": timings}), flush=True)


if __name__ == "__main__":
    main()
