"""How unsure the served model is about a volume, and where the volume sits in the encoder's embedding space.

score_volume() looks at a few slices only (a CPU scores a large volume in seconds once they are encoded):
  1. `slices` slices spread over the whole volume give the volume's descriptor (mean embedding, for cold
     starts and diversity) and, with a trained automatic head, the z-range where the model finds anything;
  2. `slices` slices spread over that range are segmented by the automatic head under test-time views (the
     slice as it is, shifted by a few pixels, gamma-changed), each view's logits mapped back exactly;
  3. per label, the parts of the score, each in [0, 1] (1 = most unsure):
     * augmentation_disagreement: 1 - Dice between each perturbed view's mask and the plain view's;
     * prompt_disagreement: 1 - Dice between the mask decoder's answer to jittered boxes around the
       automatic mask and that mask (SAM-U's multi-box idea);
     * predicted_iou_gap: 1 - the mask decoder's own predicted IoU for those boxes;
     * entropy: normalised entropy of the views' mean probabilities inside the label's predicted region;
     * version_disagreement: 1 - Dice against the previous published version's automatic mask (when it
       exists and shares the encoder);
     a label no view finds anywhere scores 1 (the model cannot find it at all).
Flips are not among the views on purpose: the head sees absolute position (the decoder's positional
encoding), so a mirrored left structure is called right, and every lateral label would look uncertain.
Plain torch: never imports the server.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib.engine.embedding_store import EmbeddingStore
from lib.engine.interactive import bounding_box
from lib.engine.preprocessing import SliceGeometry
from lib.engine.training import dice, jitter_box, run_head
from lib.engine.volumes import PreparedVolume
from lib.model.registry import LoadedModel

PARTS = (
    "augmentation_disagreement",
    "prompt_disagreement",
    "predicted_iou_gap",
    "entropy",
    "version_disagreement",
    "labels_not_found",  # share of the labels no view finds (each such label scores 1)
)


@dataclass(frozen=True)
class ScoreConfig:
    """Knobs of scoring (conf `score_slices` maps onto `slices`)."""

    slices: int = 12  # slices looked at per volume, per stage (encoding dominates the cost on a CPU)
    shift: int = 8  # encoder-input pixels of the shifted view
    gamma: float = 0.75  # intensity view: pixels ** gamma (brighter mid-tones)
    jitter_boxes: int = 2  # jittered boxes per label and slice for the decoder parts
    decoder_slices: int = 4  # of the scored slices, how many the decoder parts use (SAM's decoder repeats the
    # embedding for every box: 30 boxes on one slice cost 1.4 s on 2 cores)
    mask_threshold: float = 0.0  # decoder logit threshold (the served version's calibrated one)
    seed: int = 0


class View:
    """A test-time change of the encoder input that is undone exactly on the decoder's low-res grid.

    Args:
        name: also names the embedding store's folder, so each view's embeddings are cached apart.
        scale: low-res pixels per encoder-input pixel.
    """

    name = "identity"
    border = 0  # low-res pixels at the bottom/right that `undo` cannot fill

    def encoder_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 255] -> the same, changed."""
        return pixels

    def skip_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, h, w) uint8 low-res pixels (the automatic head's skip input) -> the same, changed."""
        return pixels

    def undo(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) logits of the changed input -> logits aligned with the unchanged slice."""
        return logits


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """Move the last two axes' content down-right by `by` (negative: up-left), zero-filled."""
    out = torch.zeros_like(x)
    if by > 0:
        out[..., by:, by:] = x[..., :-by, :-by]
    elif by < 0:
        out[..., :by, :by] = x[..., -by:, -by:]
    else:
        out = x.clone()
    return out


class Shift(View):
    def __init__(self, encoder_pixels: int, scale: float) -> None:
        low = round(encoder_pixels * scale)
        if low < 1 or abs(low / scale - encoder_pixels) > 1e-6:
            raise ValueError(f"shift {encoder_pixels} px must map to whole low-res pixels (scale {scale})")
        self.name = f"shift{encoder_pixels}"
        self.encoder_by, self.border = encoder_pixels, low

    def encoder_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return _shift(pixels, self.encoder_by)

    def skip_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return _shift(pixels, self.border)

    def undo(self, logits: torch.Tensor) -> torch.Tensor:
        return _shift(logits, -self.border)


class Gamma(View):
    def __init__(self, gamma: float) -> None:
        self.name = f"gamma{gamma:g}"
        self.gamma = gamma

    def encoder_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.clamp(0, 255) / 255.0) ** self.gamma * 255.0

    def skip_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels.float() / 255.0) ** self.gamma * 255.0).round().to(torch.uint8)


def default_views(config: ScoreConfig, image_size: int, low_res: int) -> list[View]:
    """The plain view first, then the perturbed ones."""
    return [View(), Shift(config.shift, low_res / image_size), Gamma(config.gamma)]


def view_stores(
    root: Path,
    encoder_version: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    low_res: int,
    views: Sequence[View],
) -> dict[str, EmbeddingStore]:
    """One disk store per view; the plain view's is the trainer's own (same folder, same files)."""

    def encoder(view: View) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda pixels: encode(view.encoder_pixels(pixels))

    return {
        view.name: EmbeddingStore(
            root,
            encoder_version if view.name == "identity" else f"{encoder_version}@{view.name}",
            encoder(view),
            image_size,
            low_res,
        )
        for view in views
    }


@dataclass
class VolumeScore:
    """What scoring learned about one volume.

    Attributes:
        descriptor: (256,) unit-length mean embedding of the overview slices.
        score: one number in [0, 1] (mean over labels), None when the model has no automatic head yet.
        labels: {label name: score}.
        parts: {part name: mean over the labels that have it}.
        slices: the slices the score looked at.
    """

    descriptor: np.ndarray
    score: float | None
    labels: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)
    slices: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _descriptor(embeddings: torch.Tensor) -> np.ndarray:
    """(S, 256, 64, 64) -> (256,) unit-length mean embedding."""
    return F.normalize(embeddings.float().mean(dim=(0, 2, 3)), dim=0).numpy()


def describe_volume(volume: PreparedVolume, store: EmbeddingStore, config: ScoreConfig = ScoreConfig()) -> np.ndarray:
    """The volume's descriptor alone (what a labelled volume needs): the same overview slices as scoring."""
    embeddings, _ = store.embeddings(volume, spread(0, volume.shape[2] - 1, config.slices))
    return _descriptor(embeddings)


def spread(low: int, high: int, count: int) -> list[int]:
    """`count` slices evenly inside [low, high] (ends excluded when there is room), without repeats."""
    if high - low + 1 <= count:
        return list(range(low, high + 1))
    return sorted({int(round(z)) for z in np.linspace(low, high, count + 2)[1:-1]})


def _valid_region(volume: PreparedVolume, image_size: int, low_res: int, border: int) -> tuple[slice, slice]:
    """Rows/columns of the low-res grid that hold the slice (not padding) in every view."""
    x, y, _ = volume.shape
    resized = SliceGeometry((y, x), image_size).resized_shape
    rows = math.ceil(resized[0] * low_res / image_size) - border
    columns = math.ceil(resized[1] * low_res / image_size) - border
    return slice(0, max(1, rows)), slice(0, max(1, columns))


@torch.no_grad()
def score_volume(
    model: LoadedModel,
    volume: PreparedVolume,
    stores: Mapping[str, EmbeddingStore],
    views: Sequence[View],
    config: ScoreConfig = ScoreConfig(),
    previous: LoadedModel | None = None,
) -> VolumeScore:
    """Descriptor and uncertainty of one volume under the model's automatic head (see the module doc)."""
    begin = time.perf_counter()
    network, head = model.network, model.auto_head
    depth = volume.shape[2]
    overview = spread(0, depth - 1, config.slices)
    embeddings, pixels = stores["identity"].embeddings(volume, overview)
    descriptor = _descriptor(embeddings)
    if head is None:
        return VolumeScore(descriptor, None, slices=overview, seconds=time.perf_counter() - begin)

    overview_channels = run_head(network, head, embeddings, pixels).argmax(dim=1)
    found = [z for z, c in zip(overview, overview_channels, strict=True) if c.any()]
    step = max(1, depth // (config.slices + 1))
    slices = spread(max(0, found[0] - step), min(depth - 1, found[-1] + step), config.slices) if found else overview
    low_res = network.mask_input_size[0]
    region = (..., *_valid_region(volume, network.image_size, low_res, max(v.border for v in views)))
    probabilities, plain = [], None
    for view in views:
        view_embeddings, view_pixels = stores[view.name].embeddings(volume, slices)
        logits = view.undo(run_head(network, head, view_embeddings, view.skip_pixels(view_pixels)).float())
        probabilities.append(logits.softmax(dim=1)[region])
        if plain is None:
            plain = (view_embeddings, view_pixels, logits.argmax(dim=1))
    channels = [p.argmax(dim=1) for p in probabilities]  # per view: (S, h, w)
    mean = torch.stack(probabilities).mean(dim=0)  # (S, L + 1, h, w)
    entropy = -(mean * mean.clamp(min=1e-8).log()).sum(dim=1) / math.log(mean.shape[1])

    older = None
    if (
        previous is not None
        and previous.auto_head is not None
        and previous.auto_head.names == head.names
        and previous.encoder_version == model.encoder_version
    ):
        older = run_head(previous.network, previous.auto_head, plain[0], plain[1]).argmax(dim=1)[region]

    decoder = _decoder_parts(network, plain[0], plain[2], len(head.names), config)
    labels: dict[str, float] = {}
    found: set[str] = set()
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    for channel, name in enumerate(head.names, start=1):
        masks = [c == channel for c in channels]
        union = torch.stack(masks).any(dim=0)
        if not union.any():
            labels[name] = 1.0
            continue
        found.add(name)
        values = {
            "augmentation_disagreement": 1.0 - float(np.mean([dice(m, masks[0]) for m in masks[1:]])),
            "entropy": float(entropy[union].mean()),
        }
        if channel in decoder:
            values["prompt_disagreement"], values["predicted_iou_gap"] = decoder[channel]
        if older is not None:
            values["version_disagreement"] = 1.0 - dice(older == channel, masks[0])
        labels[name] = round(float(np.mean(list(values.values()))), 4)
        for part, value in values.items():
            parts[part].append(value)
    # the ranked view says why even when the head finds nothing at all (then this is the only part)
    parts["labels_not_found"] = [sum(name not in found for name in head.names) / len(head.names)]
    return VolumeScore(
        descriptor,
        round(float(np.mean(list(labels.values()))), 4),
        labels,
        {p: round(float(np.mean(v)), 4) for p, v in parts.items() if v},
        slices,
        time.perf_counter() - begin,
    )


def _decoder_parts(
    network, embeddings: torch.Tensor, channels: torch.Tensor, count: int, config: ScoreConfig
) -> dict[int, tuple[float, float]]:
    """{channel: (prompt_disagreement, predicted_iou_gap)} from jittered boxes around the automatic masks.

    Args:
        embeddings: (S, 256, 64, 64) plain-view embeddings; channels: (S, h, w) the automatic head's argmax.
    """
    rng = np.random.default_rng(config.seed)
    scale = network.image_size / channels.shape[-1]
    agreement: dict[int, list[float]] = {}
    iou_gap: dict[int, list[float]] = {}
    device = network.pixel_mean.device
    for i in spread(0, channels.shape[0] - 1, config.decoder_slices):
        present = [c for c in range(1, count + 1) if bool((channels[i] == c).any())]
        if not present:
            continue
        boxes, owners = [], []
        for channel in present:
            tight = bounding_box((channels[i] == channel).cpu().numpy()).astype(np.float32) + np.float32([0, 0, 1, 1])
            for _ in range(config.jitter_boxes):
                boxes.append(jitter_box(tight, rng))
                owners.append(channel)
        box_tensor = torch.from_numpy(np.clip(np.stack(boxes), 0, channels.shape[-1]) * scale).to(device)
        logits, iou = network.decode(embeddings[i : i + 1].to(device).float(), None, box_tensor, None)
        for channel, logit, predicted in zip(owners, logits[:, 0].cpu(), iou[:, 0].cpu(), strict=True):
            agreement.setdefault(channel, []).append(dice(logit > config.mask_threshold, channels[i].cpu() == channel))
            iou_gap.setdefault(channel, []).append(1.0 - float(predicted.clamp(0, 1)))
    return {c: (1.0 - float(np.mean(agreement[c])), float(np.mean(iou_gap[c]))) for c in agreement}


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) x (M, D) unit vectors -> (N, M) distances 1 - cos."""
    return 1.0 - np.clip(a @ b.T, -1.0, 1.0)


def cold_start_scores(descriptors: Mapping[str, np.ndarray], labelled: set[str]) -> dict[str, dict[str, float]]:
    """Scores for unlabelled volumes before the model has learned anything, from descriptors alone.

    With labelled volumes: the farther a volume is from every labelled one, the higher (it shows the model
    something new). With none: the closer to the centre of all volumes, the higher (a typical volume first).
    Scores lie in [0.5, 1], never 0: an unscored volume must not look certain.

    Returns:
        {image id: {"score", "distance"}}, distance being the raw cosine distance used.
    """
    pool = [i for i in descriptors if i not in labelled]
    if not pool:
        return {}
    vectors = np.stack([descriptors[i] for i in pool])
    reference = [descriptors[i] for i in labelled if i in descriptors]
    if reference:
        distance = cosine_distance(vectors, np.stack(reference)).min(axis=1)
        relative = distance / distance.max() if distance.max() > 0 else np.ones_like(distance)
    else:
        centre = np.stack(list(descriptors.values())).mean(axis=0)
        centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
        distance = cosine_distance(vectors, centre[None])[:, 0]
        relative = 1.0 - (distance / distance.max() if distance.max() > 0 else np.zeros_like(distance))
    return {
        i: {"score": round(0.5 + 0.5 * float(r), 4), "distance": round(float(d), 6)}
        for i, r, d in zip(pool, relative, distance, strict=True)
    }
