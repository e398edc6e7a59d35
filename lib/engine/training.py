"""Fine-tune the mask decoder and train the automatic head on labelled volumes, the image encoder frozen.

Each step takes a few slices (their embeddings cached, see embedding_store) and trains both modes at once:
  * automatic: the AutoHead segments all labels in one pass; softmax cross-entropy + Dice;
  * prompted: prompts simulated from the ground truth the way interactive models are trained: jittered
    boxes, a click inside the object with a box around it (the server's click path), and a corrective
    click at the centre of the largest error region of the model's own prediction; BCE + Dice, and the
    IoU head learns the IoU it actually achieved.
Labels missing from a volume are treated as unknown there, not as background, so partly labelled volumes
teach what they hold and nothing wrong.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lib.engine.embedding_store import EmbeddingStore
from lib.engine.interactive import bounding_box
from lib.engine.preprocessing import SliceGeometry
from lib.engine.volumes import PreparedVolume
from lib.model.auto_head import AutoHead
from lib.model.foundation import FoundationModel
from lib.model.runtime import fast_bf16

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
# logit thresholds tried when a round calibrates the prompted mode (SAM's is 0)
THRESHOLDS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of one training round (conf keys `train_*` map onto these; README lists them)."""

    steps: int = 400  # optimiser steps per round, whatever the number of volumes (measured: ~380 reach 0.8 Dice)
    batch_slices: int = 8  # slices per step for the automatic head (cheap)
    prompted_slices: int = 1  # of those, slices that also train the prompted decoder (a decoder call each)
    prompts_per_slice: int = 2
    lr_decoder: float = 3e-4
    lr_head: float = 5e-3  # the automatic head starts from scratch
    weight_decay: float = 1e-4
    slice_step: int = 2  # every n-th slice that holds a label
    negative_slices: int = 8  # label-free slices per volume, so automatic mode learns to say "nothing here"
    bf16: bool = True  # automatic head under bfloat16 autocast where the hardware has it (measured 1.6x per step)
    corrective_click: float = 0.3  # share of prompts that get a corrective click
    click_box: float = 0.2  # share of prompts that are a click with a box around it (the server's click path)
    encoder_lora_rank: int = 0  # >0: also adapt the image encoder with LoRA (peft) of this rank; 0: encoder frozen
    seed: int = 0


@dataclass
class Case:
    """One labelled volume, ready to train on.

    Attributes:
        name: image id.
        slices: (S,) slice indices used.
        embeddings: (S, 256, 64, 64) float16 frozen-encoder embeddings.
        pixels: (S, 256, 256) uint8 encoder input on the low-res grid.
        targets: (S, 256, 256) int64 label channel per low-res pixel (0 background, i = labels[i-1]).
        present: (L,) bool, labels annotated somewhere in this volume.
    """

    name: str
    slices: np.ndarray
    embeddings: torch.Tensor
    pixels: torch.Tensor
    targets: torch.Tensor
    present: torch.Tensor


def choose_slices(label_map: np.ndarray, step: int, negatives: int, rng: np.random.Generator) -> np.ndarray:
    """Every `step`-th slice holding a label, plus label-free slices near and far from the labelled range."""
    labelled = np.nonzero(label_map.any(axis=(0, 1)))[0]
    if len(labelled) == 0:
        return labelled
    chosen = set(labelled[::step].tolist()) | {int(labelled[-1])}
    depth = label_map.shape[2]
    empty = np.setdiff1d(np.arange(depth), labelled)
    if len(empty) and negatives:
        near = [z for z in empty if min(abs(z - labelled[0]), abs(z - labelled[-1])) <= 12]
        near_pick = rng.choice(near, size=min(len(near), negatives // 2), replace=False) if near else []
        far_pick = rng.choice(empty, size=min(len(empty), negatives - len(near_pick)), replace=False)
        chosen |= {int(z) for z in near_pick} | {int(z) for z in far_pick}
    return np.asarray(sorted(chosen))


def low_res_targets(
    label_map: np.ndarray, slices: np.ndarray, channel_of: np.ndarray, image_size: int, low_res: int
) -> torch.Tensor:
    """(X, Y, Z) label values -> (S, low_res, low_res) channel indices on the decoder's output grid."""
    x, y, _ = label_map.shape
    geometry = SliceGeometry((y, x), image_size)
    maps = torch.from_numpy(channel_of[label_map[:, :, slices].transpose(2, 1, 0)].astype(np.float32))[:, None]
    resized = F.interpolate(maps, size=geometry.resized_shape, mode="nearest")
    padded = F.pad(resized, (0, image_size - geometry.resized_shape[1], 0, image_size - geometry.resized_shape[0]))
    if image_size != low_res:
        padded = F.interpolate(padded, size=(low_res, low_res), mode="nearest")
    return padded[:, 0].long()


def prepare_case(
    name: str,
    volume: PreparedVolume,
    label_map: np.ndarray,
    labels: dict[str, int],
    store: EmbeddingStore,
    model: FoundationModel,
    config: TrainConfig,
    progress: Progress | None = None,
) -> Case:
    """Embed the training slices of one labelled volume (cached on disk) and map its labels to channels."""
    if label_map.shape != volume.shape:
        raise ValueError(f"{name}: label shape {label_map.shape} does not match image shape {volume.shape}")
    channel_of = np.zeros(256, np.int64)
    for channel, index in enumerate(labels.values(), start=1):
        channel_of[index] = channel
    known = channel_of[label_map] > 0
    rng = np.random.default_rng([config.seed, sum(map(ord, name))])
    slices = choose_slices(known, config.slice_step, config.negative_slices, rng)
    present = torch.tensor([bool(np.any(label_map == index)) for index in labels.values()])
    embeddings, pixels = store.embeddings(volume, slices.tolist(), progress)
    targets = low_res_targets(label_map, slices, channel_of, model.image_size, model.mask_input_size[0])
    return Case(name, slices, embeddings, pixels, targets, present)


# ---- prompts simulated from the ground truth ---------------------------------------------------------------


def _box(mask: np.ndarray) -> np.ndarray:
    """(4,) x0, y0, x1, y1 of a non-empty (H, W) mask, the far edges exclusive (SAM's box convention)."""
    return bounding_box(mask).astype(np.float32) + np.float32([0, 0, 1, 1])


def jitter_box(box: np.ndarray, rng: np.random.Generator, fraction: float = 0.1, pixels: float = 2.0) -> np.ndarray:
    """Each side moved by up to `fraction` of the box side plus `pixels`, as a person's drawn box would be."""
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float32)
    return box + rng.uniform(-1, 1, 4).astype(np.float32) * (side * fraction + pixels)


def centre_of(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the most interior pixel of the largest connected part of `region` (the RITM click rule)."""
    parts, count = ndimage.label(region)
    if count > 1:
        sizes = ndimage.sum_labels(region, parts, index=np.arange(1, count + 1))
        region = parts == int(np.argmax(sizes)) + 1
    distance = ndimage.distance_transform_edt(region)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def _dice_loss(probabilities: torch.Tensor, targets: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    intersection = (probabilities * targets).sum(dims)
    return 1 - (2 * intersection + 1) / (probabilities.sum(dims) + targets.sum(dims) + 1)


def class_weights(cases: Sequence[Case], count: int) -> torch.Tensor:
    """(L + 1,) cross-entropy weights, inverse square root of each channel's pixel share, mean 1.

    Without them the background (>95 % of pixels) wins and small structures are learned last or never
    (measured: after 160 steps 2 of 10 labels found unweighted, all 10 weighted).
    """
    counts = torch.zeros(count + 1)
    for case in cases:
        counts += torch.bincount(case.targets.flatten(), minlength=count + 1)[: count + 1].float()
    weights = (counts.sum() / counts.clamp(min=1)).sqrt()
    return weights / weights.mean()


def auto_loss(
    logits: torch.Tensor, targets: torch.Tensor, present: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Class-weighted cross-entropy + Dice over background and the labels.

    Args:
        logits: (B, L + 1, h, w), channel 0 background; targets: (B, h, w) channel indices; present: (B, L)
            labels known in each slice's volume (the others are left out of that slice's softmax).
        weights: (L + 1,) cross-entropy class weights (see class_weights).
    """
    count = logits.shape[1] - 1
    known = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)[:, :, None, None]
    full = logits.masked_fill(~known, -1e4)
    cross_entropy = F.cross_entropy(full, targets, weight=weights)
    probabilities = full.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(targets, count + 1).permute(0, 3, 1, 2)[:, 1:].float()
    in_batch = onehot.sum(dim=(0, 2, 3)) > 0
    dice = _dice_loss(probabilities, onehot, (0, 2, 3))[in_batch].mean() if in_batch.any() else 0.0
    return cross_entropy + dice


@dataclass
class PromptBatch:
    """Prompts on one slice, in encoder-input pixels: boxes (N, 4), optional clicks (N, 1, 2) + labels (N, 1)."""

    boxes: torch.Tensor
    targets: torch.Tensor  # (N, 1, h, w) float
    points: tuple[torch.Tensor, torch.Tensor] | None = None
    kinds: list[str] = field(default_factory=list)


def simulate_prompts(
    model: FoundationModel,
    embedding: torch.Tensor,
    target: torch.Tensor,
    channels: Sequence[int],
    rng: np.random.Generator,
    config: TrainConfig,
) -> PromptBatch:
    """Prompts for the given label channels of one slice; one prompt kind per call, as the server sends them.

    Args:
        embedding: (1, 256, 64, 64); target: (h, w) channel indices on the low-res grid.
    """
    low_res = target.shape[-1]
    scale = model.image_size / low_res
    masks = [(target == c).numpy() for c in channels]
    draw = rng.random()
    kind = (
        "box"
        if draw >= config.corrective_click + config.click_box
        else ("corrective" if draw < config.corrective_click else "click")
    )
    boxes, clicks = [], []
    for mask in masks:
        tight = _box(mask)
        if kind == "click":
            x, y = centre_of(mask)
            half = rng.choice([0.03, 0.05, 0.08, 0.12]) * low_res + rng.uniform(0, 2)
            boxes.append(np.array([x - half, y - half, x + 1 + half, y + 1 + half], np.float32))
            clicks.append((x + 0.5, y + 0.5, 1))
        else:
            boxes.append(jitter_box(tight, rng))
    device = embedding.device
    box_tensor = torch.from_numpy(np.clip(np.stack(boxes), 0, low_res) * scale).to(device)
    targets = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(device)
    if kind == "corrective":
        with torch.no_grad():
            logits, _ = model.decode(embedding, None, box_tensor, None)
        for mask, predicted in zip(masks, (logits[:, 0] > 0).cpu().numpy(), strict=True):
            missed, extra = mask & ~predicted, predicted & ~mask
            region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
            if not region.any():
                region, label = mask, 1
            x, y = centre_of(region)
            clicks.append((x + 0.5, y + 0.5, label))
    points = None
    if clicks:
        array = np.asarray(clicks, np.float32)
        points = (
            torch.from_numpy(array[:, None, :2] * scale).to(device),
            torch.from_numpy(array[:, None, 2]).long().to(device),
        )
    return PromptBatch(box_tensor, targets, points, [kind] * len(masks))


def prompted_loss(model: FoundationModel, embedding: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
    """BCE + Dice of the single-mask output, plus MSE of the predicted IoU against the IoU achieved."""
    logits, iou = model.decode(embedding, prompts.points, prompts.boxes, None)
    targets = prompts.targets
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    dice = _dice_loss(logits.sigmoid(), targets, (1, 2, 3)).mean()
    with torch.no_grad():
        predicted = logits > 0
        union = (predicted | (targets > 0)).sum(dim=(1, 2, 3)).clamp(min=1)
        achieved = (predicted & (targets > 0)).sum(dim=(1, 2, 3)) / union
    return bce + dice + F.mse_loss(iou[:, 0], achieved.float())


# ---- evaluation --------------------------------------------------------------------------------------------


def embed(model: FoundationModel, case: Case, rows: Sequence[int] | slice) -> torch.Tensor:
    """(B, 256, 64, 64) float embeddings of some of a case's slices on the model's device.

    The frozen encoder's come from the case's cache; an encoder being adapted (LoRA) or adapted this round
    (`model.adapted_encoder`) recomputes them from the cached input pixels.
    """
    if not getattr(model, "adapted_encoder", False):
        return case.embeddings[rows].to(model.pixel_mean.device).float()
    return encode_cached_pixels(model, case.pixels[rows])


def encode_cached_pixels(model: FoundationModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 256, 256) uint8 cached encoder input -> (B, 256, 64, 64) float embeddings, with autograd if enabled."""
    rgb = pixels.to(model.pixel_mean.device).float()[:, None].expand(-1, 3, -1, -1)
    return model.image_encoder(model.normalize(rgb)).float()


def attach_lora(model: FoundationModel, rank: int) -> torch.nn.Module:
    """Wrap the image encoder in LoRA adapters (peft) on its attention projections; returns the peft model."""
    if model.image_size != model.mask_input_size[0]:
        raise ValueError("encoder adaptation needs the encoder input on the decoder's grid (LiteMedSAM's 256 px)")
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(
        model.image_encoder,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["qkv", "proj"], lora_dropout=0.0),
    )
    model.image_encoder = adapted
    model.adapted_encoder = True
    return adapted


def run_head(model: FoundationModel, head: AutoHead, embeddings: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 256, 64, 64) embeddings + (B, 256, 256) uint8 pixels -> (B, L + 1, 256, 256) logits."""
    device = model.pixel_mean.device
    embeddings = embeddings.to(device=device, dtype=torch.float32, memory_format=torch.channels_last)  # the head's
    return head(embeddings, model.dense_pe(), pixels.to(device).float().unsqueeze(1) / 255.0)


def dice(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two boolean tensors; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


@torch.no_grad()
def evaluate(
    model: FoundationModel,
    head: AutoHead | None,
    cases: Sequence[Case],
    names: Sequence[str],
    prompted: bool = True,
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict:
    """Validation Dice per label, for automatic mode (over each volume's sampled slices) and box prompts.

    Returns {"auto": {name: dice}, "auto_mean", "prompted": {name: dice}, "prompted_mean", "threshold"};
    auto is 0 for every label when there is no automatic head yet. Prompted uses the tight box on each slice
    and reports the best of `thresholds` (the served threshold of the version).
    """
    model.eval()
    device = model.pixel_mean.device
    auto: dict[str, list[float]] = {n: [] for n in names}
    boxed: dict[float, dict[str, list[float]]] = {t: {n: [] for n in names} for t in thresholds}
    if head is not None:
        head.eval()
    for case in cases:
        predictions = []
        # 16 slices at a time, each chunk embedded once for both modes: cached embeddings are converted a chunk at
        # a time (a whole case in float32 can be hundreds of MB), and an adapted encoder costs seconds a slice
        for start in range(0, len(case.slices), 16):
            rows = slice(start, start + 16)
            embeddings = embed(model, case, rows)
            if head is not None:
                predictions.append(run_head(model, head, embeddings, case.pixels[rows]).argmax(dim=1).cpu())
            if not prompted:
                continue
            for offset, target in enumerate(case.targets[rows]):
                channels = [c for c in range(1, len(names) + 1) if bool((target == c).any())]
                if not channels:
                    continue
                boxes = torch.from_numpy(np.stack([_box((target == c).numpy()) for c in channels]))
                boxes = (boxes * (model.image_size / case.targets.shape[-1])).to(device)
                logits, _ = model.decode(embeddings[offset : offset + 1], None, boxes, None)
                for c, logit in zip(channels, logits[:, 0].cpu(), strict=True):
                    for threshold in thresholds:
                        boxed[threshold][names[c - 1]].append(dice(logit > threshold, target == c))
        predicted = torch.cat(predictions) if predictions else None
        for channel, name in enumerate(names, start=1):
            if case.present[channel - 1]:
                truth = case.targets == channel
                auto[name].append(dice(predicted == channel, truth) if predicted is not None else 0.0)

    def means(values: dict[str, list[float]]) -> dict[str, float]:
        return {n: round(float(np.mean(v)), 4) for n, v in values.items() if v}

    result: dict = {"auto": means(auto)}
    result["auto_mean"] = round(float(np.mean(list(result["auto"].values()))), 4) if result["auto"] else 0.0
    if prompted and any(boxed[thresholds[0]].values()):
        scores = {t: float(np.mean([np.mean(v) for v in boxed[t].values() if v])) for t in thresholds}
        best = max(thresholds, key=lambda t: (round(scores[t], 4), -abs(t)))
        result.update(prompted=means(boxed[best]), prompted_mean=round(scores[best], 4), threshold=best)
    return result


# ---- the round ---------------------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    epochs: int
    steps: int
    seconds: float
    history: list[dict]


def train(
    model: FoundationModel,
    head: AutoHead,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    config: TrainConfig,
    progress: Progress = logger.info,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainOutcome:
    """Train the mask decoder and the automatic head in place; the image and prompt encoders stay frozen."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    decoder_parameters = list(model.mask_decoder.parameters())
    for parameter in decoder_parameters:
        parameter.requires_grad_(True)
    adapter = attach_lora(model, config.encoder_lora_rank) if config.encoder_lora_rank else None
    if adapter is not None:  # only the low-rank matrices train; the encoder's own weights stay as they were
        decoder_parameters += [p for n, p in adapter.named_parameters() if "lora_" in n and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": decoder_parameters, "lr": config.lr_decoder},
            {"params": list(head.parameters()), "lr": config.lr_head},
        ],
        weight_decay=config.weight_decay,
    )
    device = model.pixel_mean.device
    head.to(device)
    weights = class_weights(train_cases, len(head.names)).to(device)
    fast_head = config.bf16 and fast_bf16(device)
    samples = [(c, i) for c, case in enumerate(train_cases) for i in range(len(case.slices))]
    steps_per_epoch = max(1, math.ceil(len(samples) / config.batch_slices))
    # exactly `steps` steps: the last epoch may be cut short (a whole extra epoch tripled a 2-step LoRA round)
    total = max(1, config.steps)
    epochs = math.ceil(total / steps_per_epoch)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    begin, step, history = time.perf_counter(), 0, []
    progress(f"training {total} steps ({epochs} epochs of up to {steps_per_epoch}) on {len(samples)} slices")
    for epoch in range(1, epochs + 1):
        model.mask_decoder.train()
        head.train()
        order = rng.permutation(len(samples))
        losses = []
        for start in range(0, len(order), config.batch_slices):
            if step == total:
                break
            if should_stop():
                progress("training stopped on request")
                _finish(model, head, adapter)
                return TrainOutcome(epoch - 1, step, time.perf_counter() - begin, history)
            # linear warm-up over the first tenth, then cosine decay
            factor = min(1.0, (step + 1) / max(1, total // 10)) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
            picked = [samples[j] for j in order[start : start + config.batch_slices]]
            pixels = torch.stack([train_cases[c].pixels[i] for c, i in picked])
            if adapter is None:
                embeddings = torch.stack([train_cases[c].embeddings[i] for c, i in picked]).to(device).float()
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_head):
                    embeddings = encode_cached_pixels(model, pixels)
            targets = torch.stack([train_cases[c].targets[i] for c, i in picked])
            present = torch.stack([train_cases[c].present for c, _ in picked]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_head):
                logits = run_head(model, head, embeddings, pixels)
            loss = auto_loss(logits.float(), targets.to(device), present, weights)
            prompted_terms = []
            for k in range(len(picked)):
                if len(prompted_terms) == config.prompted_slices:
                    break
                channels = [ch for ch in torch.unique(targets[k]).tolist() if ch > 0]
                if not channels:
                    continue
                chosen = rng.choice(channels, size=min(len(channels), config.prompts_per_slice), replace=False)
                batch = simulate_prompts(model, embeddings[k : k + 1], targets[k], chosen.tolist(), rng, config)
                prompted_terms.append(prompted_loss(model, embeddings[k : k + 1], batch))
            if prompted_terms:
                loss = loss + torch.stack(prompted_terms).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder_parameters + list(head.parameters()), 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        # a few volumes make many short epochs: validate about 10 times a round (each costs about a step), and
        # after the last epoch. Not while the encoder adapts: each validation slice then costs an encoder pass
        # (seconds on a CPU), and the round evaluates the result once at the end anyway.
        if val_cases and adapter is None and (epoch % max(1, epochs // 10) == 0 or epoch == epochs):
            validation = evaluate(model, head, val_cases, head.names, prompted=False)["auto_mean"]
        else:
            validation = None
        record = {
            "epoch": epoch,
            "loss": round(float(np.mean(losses)), 4),
            "val_auto_dice": validation,
            "seconds": round(time.perf_counter() - begin, 1),
        }
        history.append(record)
        shown = "" if validation is None else f", validation Dice (automatic) {validation}"
        progress(f"epoch {epoch}/{epochs}: loss {record['loss']:.4f}{shown}, {record['seconds']:.0f} s")
    _finish(model, head, adapter)
    return TrainOutcome(epochs, step, time.perf_counter() - begin, history)


def _finish(model: FoundationModel, head: AutoHead, adapter: torch.nn.Module | None) -> None:
    """Back to inference: LoRA merged into the encoder's weights (a plain encoder to save and serve)."""
    if adapter is not None:
        model.image_encoder = adapter.merge_and_unload()
    model.eval()
    head.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
