"""One continual-learning round: labelled volumes in, a gated new model version out.

prepare (embed new volumes, cached) -> split by volume -> score the served model on the validation
volumes -> fine-tune -> score the candidate on the same volumes and on earlier rounds' volumes ->
store the version with its metrics -> serve it only if it is not worse (tolerance) than the served one.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import nibabel as nib
import numpy as np

from lib.engine.embedding_store import EmbeddingStore
from lib.engine.training import Case, Progress, TrainConfig, evaluate, prepare_case, train
from lib.engine.volumes import VolumeStore
from lib.model.auto_head import AutoHead
from lib.model.registry import LoadedModel
from lib.model.versions import VersionStore

logger = logging.getLogger(__name__)


class RoundError(ValueError):
    """A round that cannot run (e.g. too few labelled volumes); the message says what is missing."""


@dataclass(frozen=True)
class LabelledImage:
    """A volume with a final label: its id, files, and when the label was saved (to tell new labels apart)."""

    image_id: str
    image_path: str
    label_path: str
    label_ts: float = 0.0


@dataclass(frozen=True)
class RoundConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.25
    gate_tolerance: float = 0.01  # mean Dice a new version may lose against the served one and still be served


def split_by_volume(images: Sequence[LabelledImage], val_fraction: float) -> tuple[list, list]:
    """(train, validation), decided by a hash of each image id: stable as labels are added, never random."""
    if len(images) < 2:
        raise RoundError(
            f"a round needs at least 2 labelled volumes (one to train on, one to validate); have {len(images)}"
        )
    ranked = sorted(images, key=lambda i: hashlib.sha1(i.image_id.encode()).hexdigest())
    count = min(len(images) - 1, max(1, round(len(images) * val_fraction)))
    return ranked[count:], ranked[:count]


def _score(metrics: dict) -> tuple[float, float]:
    return float(metrics.get("auto_mean") or 0.0), float(metrics.get("prompted_mean") or 0.0)


@dataclass
class RoundReport:
    version: int
    published: bool
    reason: str
    metrics: dict


def run_round(
    served: LoadedModel,
    images: Sequence[LabelledImage],
    labels: dict[str, int],
    versions: VersionStore,
    embeddings: EmbeddingStore,
    volumes: VolumeStore,
    config: RoundConfig = RoundConfig(),
    progress: Progress = logger.info,
    should_stop: Callable[[], bool] = lambda: False,
) -> RoundReport:
    """Train a new version from `served` on every labelled image (replay of all earlier labels included)."""
    begin = time.perf_counter()
    train_images, val_images = split_by_volume(images, config.val_fraction)
    progress(
        f"round on {len(images)} labelled volumes: {len(train_images)} to train, {len(val_images)} to validate "
        f"({', '.join(i.image_id for i in val_images)}); starting from {served.version}"
    )
    network = copy.deepcopy(served.network)  # the served model stays untouched until the gate says so
    names = list(labels)

    def case(image: LabelledImage) -> Case:
        label_map = np.asarray(nib.load(image.label_path).dataobj)
        if label_map.ndim == 4 and label_map.shape[-1] == 1:
            label_map = label_map[..., 0]
        volume = volumes.get(image.image_path)
        return prepare_case(
            image.image_id,
            volume,
            label_map.astype(np.uint8),
            labels,
            embeddings,
            network,
            config.train,
            lambda m: progress(f"{image.image_id}: {m}"),
        )

    train_cases = [case(i) for i in train_images]
    val_cases = [case(i) for i in val_images]
    prepared = time.perf_counter() - begin
    progress(f"prepared {len(train_cases) + len(val_cases)} volumes in {prepared:.0f} s; scoring the served model")
    before = evaluate(served.network, served.auto_head, val_cases, names)
    progress(f"served model on validation: automatic {before['auto_mean']}, prompted {before.get('prompted_mean')}")

    head = copy.deepcopy(served.auto_head) if served.auto_head is not None else AutoHead(names)
    if head.names != names:
        progress(f"labels changed from {head.names} to {names}: the automatic head starts afresh")
        head = AutoHead(names)
    outcome = train(network, head, train_cases, val_cases, config.train, progress, should_stop)
    after = evaluate(network, head, val_cases, names)
    previous_ids = set(versions.meta(versions.latest()).get("labels_used", {}))
    earlier = [c for c, i in zip(train_cases, train_images, strict=True) if i.image_id in previous_ids]
    forgetting = evaluate(network, head, earlier, names) if earlier else None

    auto_before, prompted_before = _score(before)
    auto_after, prompted_after = _score(after)
    tolerance = config.gate_tolerance
    worse = []
    if auto_after < auto_before - tolerance:
        worse.append(f"automatic Dice {auto_after:.3f} < served {auto_before:.3f}")
    if prompted_after < prompted_before - tolerance:
        worse.append(f"prompted Dice {prompted_after:.3f} < served {prompted_before:.3f}")
    published = not worse and not should_stop()
    reason = (
        f"not worse than served version {served.number} (tolerance {tolerance})"
        if published
        else ("stopped" if not worse else "; ".join(worse))
    )
    metrics = {
        "validation": after,
        "served_before": {"version": served.number, **before},
        "earlier_labels": forgetting,
        "train_seconds": round(outcome.seconds, 1),
        "prepare_seconds": round(prepared, 1),
        "round_seconds": round(time.perf_counter() - begin, 1),
        "epochs": outcome.epochs,
        "steps": outcome.steps,
        "history": outcome.history,
    }
    state = {"mask_decoder": network.mask_decoder.state_dict(), "auto_head": head.state_dict()}
    encoder_trained = config.train.encoder_lora_rank > 0
    if encoder_trained or served.encoder_of:
        state["image_encoder"] = network.image_encoder.state_dict()
    meta = {
        "parent": served.number,
        "labels": names,
        "labels_used": {i.image_id: i.label_ts for i in images},
        "train_images": [i.image_id for i in train_images],
        "val_images": [i.image_id for i in val_images],
        "mask_threshold": after.get("threshold", 0.0),
        "encoder_trained": encoder_trained,  # LoRA this round: cached embeddings of earlier versions do not apply
        "encoder_of": None if encoder_trained else served.encoder_of,
        "train_config": asdict(config.train),
        "metrics": metrics,
        "reason": reason,
    }
    version = versions.add(state, meta)
    if published:
        versions.serve(version, reason)
        progress(f"published version {version}: automatic {auto_after:.3f}, prompted {prompted_after:.3f} ({reason})")
    else:
        progress(f"version {version} kept but not served: {reason}")
    return RoundReport(version, published, reason, metrics)
