"""The CUDA path end to end, timed: encoder, decoder, a continual round and automatic segmentation.

    python -m lib.evaluation.device_check --data <sample data> --device cuda [--steps 400]

Runs the same engine code the server runs (no server: that needs monailabel, which a bare GPU machine may
lack) on two labelled sample volumes, and prints one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lib.engine.auto import auto_segment
from lib.engine.cache import EmbeddingCache
from lib.engine.continual import LabelledImage, RoundConfig, run_round
from lib.engine.embedding_store import EmbeddingStore
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.training import TrainConfig
from lib.engine.volumes import VolumeStore
from lib.model import build_model
from lib.model.runtime import TorchEncoder, synchronize
from lib.model.versions import VersionStore


def timed(device: torch.device, fn, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotune, lazy init)
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - begin) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--subjects", default="sub-01,sub-02")
    parser.add_argument("--lora", type=int, default=8, help="rank of a second round that adapts the encoder")
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    labels = json.loads((args.data / "labels.json").read_text())
    base = build_model("lite_medsam", model_dir=work / "model", device=device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    report["torch"] = torch.__version__

    network = base.network
    pixels = torch.rand(8, 3, 256, 256, device=device) * 255
    normalized = network.normalize(pixels)
    # the product's own torch runtime; fp16 is what `encoder_bf16 true` runs on a GPU, bf16 for comparison
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        encoder = TorchEncoder(network.image_encoder, device, dtype)
        report[f"encoder_ms_per_slice_{name}_batch8"] = round(
            1000 * timed(device, lambda encoder=encoder: encoder(normalized), 5) / 8, 2
        )
    embedding = torch.randn(1, 256, 64, 64, device=device)
    box = torch.tensor([[60.0, 60.0, 120.0, 130.0]], device=device)
    with torch.no_grad():
        report["decoder_ms_per_box"] = round(
            1000 * timed(device, lambda: network.decode(embedding, None, box, None), 20), 2
        )

    subjects = args.subjects.split(",")
    images = [
        LabelledImage(s, str(args.data / "studies" / f"{s}.nii.gz"), str(args.data / "ground-truth" / f"{s}.nii.gz"))
        for s in subjects
    ]
    predictor = SlicePredictor(base, EmbeddingCache(2 << 30), device=device, encoder_autocast=True)
    store = EmbeddingStore.for_model(work / "embeddings", base, predictor.encode_pixels, batch=16)
    versions = VersionStore(work / "model", base.base_version)
    volumes = VolumeStore(IntensityConfig())
    outcome = run_round(
        base, images, labels, versions, store, volumes, RoundConfig(train=TrainConfig(steps=args.steps))
    )
    report["round"] = {
        "published": outcome.published,
        "reason": outcome.reason,
        **{k: outcome.metrics[k] for k in ("round_seconds", "prepare_seconds", "train_seconds", "steps")},
        "validation_auto_mean": outcome.metrics["validation"]["auto_mean"],
        "validation_prompted_mean": outcome.metrics["validation"].get("prompted_mean"),
        "served_before_prompted_mean": outcome.metrics["served_before"].get("prompted_mean"),
    }
    number = versions.served()
    served = base.with_version(number, versions.load_state(number), versions.meta(number))
    if args.lora:
        lora_config = RoundConfig(train=TrainConfig(steps=args.steps, encoder_lora_rank=args.lora))
        lora = run_round(served, images, labels, versions, store, volumes, lora_config)
        report["lora_round"] = {
            "rank": args.lora,
            "published": lora.published,
            "reason": lora.reason,
            **{k: lora.metrics[k] for k in ("round_seconds", "train_seconds", "steps")},
            "validation_auto_mean": lora.metrics["validation"]["auto_mean"],
            "validation_prompted_mean": lora.metrics["validation"].get("prompted_mean"),
        }
        number = versions.served()
        served = base.with_version(number, versions.load_state(number), versions.meta(number))
        report["served_encoder_version"] = served.encoder_version
    predictor.use_model(served)
    volume = volumes.get(images[0].image_path)
    begin = time.perf_counter()
    result = auto_segment(predictor, volume, labels)
    synchronize(device)
    report["auto_segment"] = {
        "seconds": round(time.perf_counter() - begin, 2),
        "slices": result.info["slices_segmented"],
        "labels_found": len(result.info["labels_found"]),
    }
    if device.type == "cuda":
        report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    report["voxels_labelled"] = int(np.count_nonzero(result.mask))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
