"""Box-prompted 3D, axial propagation against three planes (`--conf propagation_planes 3`), with what each costs.

    python -m lib.evaluation.compare_planes --data sample-data/build --subjects sub-04,sub-05

Each structure gets the CVPR 2025 challenge's prompt (tight box on its middle slice + z-range, that slice named)
and is segmented with the server's settings twice: axial walk alone, then the three planes. Both share one
embedding cache, so the three-plane run pays only for its sagittal and coronal slices: the extra encodes and
seconds it prints are the price of the option. Engine only, no HTTP.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.engine.cache import EmbeddingCache
from lib.engine.interactive import propagate
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.prompts import Prompt
from lib.engine.volumes import VolumeStore
from lib.evaluation.ground_truth import dice, middle_slice, roi_3d
from lib.model import build_model
from lib.settings import AppSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--subjects", default="sub-04,sub-05")
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--structures", default="", help="comma-separated label names (default: all)")
    args = parser.parse_args()
    labels = json.loads((args.data / "labels.json").read_text())
    settings = AppSettings(model=args.model)
    predictor = SlicePredictor(
        build_model(args.model), EmbeddingCache(8 << 30), encoder_runtime=settings.encoder_runtime,
        mask_threshold=settings.decoder_threshold,
    )  # fmt: skip
    predictor.encoder()  # the OpenVINO export is not a request's cost
    configs = {planes: replace(settings.propagation_config(), planes=planes) for planes in (1, 3)}
    store = VolumeStore(IntensityConfig())
    rows = []
    for subject in args.subjects.split(","):
        volume = store.get(args.data / "studies" / f"{subject}.nii.gz")
        truth = np.asarray(nib.load(args.data / "ground-truth" / f"{subject}.nii.gz").dataobj)
        for name, index in labels.items():
            if args.structures and name not in args.structures.split(","):
                continue
            structure = truth == index
            prompt = Prompt.from_request({"roi": roi_3d(structure), "slice": middle_slice(structure)}, volume.shape)
            row = {"subject": subject, "structure": name}
            for planes, config in configs.items():
                encoded, begin = predictor.encoded_slices, time.perf_counter()
                result = propagate(predictor, volume, prompt, config)
                row[f"dice_{planes}"] = round(dice(result.mask, structure), 4)
                row[f"encoded_{planes}"] = predictor.encoded_slices - encoded
                row[f"seconds_{planes}"] = round(time.perf_counter() - begin, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for planes in (1, 3):
        print(
            f"planes {planes}: mean 3D Dice {np.mean([r[f'dice_{planes}'] for r in rows]):.3f}, "
            f"{sum(r[f'encoded_{planes}'] for r in rows)} slices encoded, "
            f"{sum(r[f'seconds_{planes}'] for r in rows):.0f} s"
        )


if __name__ == "__main__":
    main()
