"""Seconds of a 3D request whose slices were all decoded before (a click after a box): the server's
segmentation service as the default settings build it, without HTTP.

    python -m lib.evaluation.time_cached_3d --data sample-data/build --subject sub-01

Each structure gets the CVPR 2025 challenge's box prompt (tight box on its middle slice + z-range); one
request warms the embedding cache and the predictor's remembered decodes, then the same prompt, and the
prompt with a click at the structure's middle, are timed `--repeat` times each. What is left is the
propagation's own work (boxes, cuts, the 3D smoothing), which every click of a 3D session pays.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.service import SegmentationService
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
    config = replace(settings.service_config(None), prefetch_slices=0)
    service = SegmentationService(build_model(settings.model), config, device=settings.torch_device())
    image = str(args.data / "studies" / f"{args.subject}.nii.gz")
    truth = np.asarray(nib.load(args.data / "ground-truth" / f"{args.subject}.nii.gz").dataobj)
    for name in args.structures.split(","):
        structure = truth == labels[name]
        z = middle_slice(structure)
        box = {"roi": roi_3d(structure), "slice": z}
        x, y = centre_click(structure[:, :, z])
        requests = {"box": box, "box + click": {**box, "foreground": [[int(x), int(y), z]]}}
        service.segment(image, box, 3)  # encodes and decodes
        timings = {}
        for label, request in requests.items():
            seconds = []
            for _ in range(args.repeat):
                begin = time.perf_counter()
                service.segment(image, request, 3)
                seconds.append(time.perf_counter() - begin)
            timings[label] = [round(1000 * s) for s in seconds]
        print(json.dumps({"structure": name, "ms": timings}), flush=True)


if __name__ == "__main__":
    main()
