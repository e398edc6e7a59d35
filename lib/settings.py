"""The app's configuration: every `--conf key value` option, its default, and a clear error for a bad value."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lib.engine.interactive import PropagationConfig
from lib.engine.preprocessing import IntensityConfig
from lib.engine.service import ServiceConfig
from lib.model.registry import MODEL_REGISTRY, ModelSpec
from lib.model.runtime import RUNTIMES

DEFAULT_LABELS = {"structure": 1}


class ConfError(ValueError):
    """A `--conf` value that cannot be used; the message names the key and what it accepts."""


def _bool(key: str, value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfError(f"--conf {key} {value!r}: expected true or false")


def _number(key: str, value: str, kind: type, minimum: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfError(f"--conf {key} {value!r}: expected a {kind.__name__}") from None
    if not math.isfinite(number):  # nan passes every comparison below
        raise ConfError(f"--conf {key} {value!r}: expected a finite number")
    if number < minimum:
        raise ConfError(f"--conf {key} {value!r}: must be at least {minimum}")
    return number


def parse_labels(value: str) -> dict[str, int]:
    """Labels as `a,b,c` (indices 1..n), a JSON list, a JSON {name: index} map, or a path to such a JSON file."""
    text = value.strip()
    if text and not text.startswith(("[", "{")) and Path(text).is_file():
        text = Path(text).read_text()
    try:
        parsed = json.loads(text) if text.startswith(("[", "{")) else [s.strip() for s in text.split(",") if s.strip()]
    except json.JSONDecodeError as error:
        raise ConfError(f"--conf labels: invalid JSON ({error})") from None
    if isinstance(parsed, list):
        parsed = {str(name): i + 1 for i, name in enumerate(parsed)}
    if not isinstance(parsed, dict) or not parsed:
        raise ConfError("--conf labels: expected names `a,b`, a JSON list or a JSON {name: index} map")
    labels = {}
    for name, index in parsed.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 < index < 256:
            raise ConfError(f"--conf labels: index of {name!r} must be an integer in 1..255, got {index!r}")
        labels[str(name)] = index
    if len(set(labels.values())) != len(labels):
        raise ConfError("--conf labels: two labels share an index")
    return labels


@dataclass(frozen=True)
class AppSettings:
    """All options (README lists them with these defaults)."""

    model: str = "lite_medsam"  # a name of lib.model.MODEL_REGISTRY
    checkpoint: str | None = None  # file or URL overriding the model's default weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    cache_mb: int = 1024  # embedding cache budget, shared by all users
    volume_cache_mb: int = 512  # prepared (uint8) volumes kept in memory, so each annotator's stays loaded
    max_megavoxels: float = 512.0  # images and labels with more voxels (millions) are refused (413)
    # training and scoring subprocesses run at this lower CPU priority (0-19), so clicks keep their speed
    background_nice: int = 10
    modality: str = "auto"  # auto | CT | MR
    dicomweb_modalities: tuple[str, ...] = ("CT", "MR")  # series a DICOMweb datastore lists (MONAI Label: CT only)
    ct_window: tuple[float, float] = (40.0, 400.0)  # level, width (HU)
    prefetch_slices: int = 48  # slices pre-encoded when an image is handed out (0: off)
    propagation_margin: int = 3  # pixels around the previous slice's mask box
    propagation_mask_prompt: bool = False  # previous slice's logits as mask prompt (measured worse)
    propagation_end_taper: bool = True  # narrow the box towards the roi's z-ends (lib.engine.interactive)
    # cut propagated masks to the roi's in-plane box grown by this fraction a side (<0: no cut); None: the
    # model's own (LiteMedSAM 0.5, SAM family 0.25)
    propagation_roi_slack: float | None = None
    # move each propagated box towards the centre a sagittal and a coronal cut show, by at most this many pixels
    propagation_plane_guide: float = 2.0
    propagation_smooth: float = 1.0  # Gaussian sigma (voxels) that smooths the propagated logits across slices (0: off)
    # 3: with an roi, also propagate through sagittal and coronal slices and fuse the three masks; 1: axial only
    propagation_planes: int = 1
    click_corrections: bool = True  # edit masks to agree with every click (off: the model's mask as it is)
    focus_context: float = 3.0  # 2D box prompts: segment a window this many times the box (0: whole slice)
    # the image encoder: float32 on OpenVINO (auto, on a CPU) answers exactly as torch float32 at bf16 torch's speed;
    # bf16 is faster still but changes masks (mean Dice 0.96 against float32 on the sample slices; README "Speed")
    encoder_runtime: str = "auto"  # auto | torch | openvino
    encoder_bf16: bool = False  # low-precision encoder: bfloat16 on CPUs with native bf16, float16 on a GPU
    # OpenVINO encoder threads (0: as many as torch uses); fewer leave cores to clicks' decodes (README "Under load")
    encoder_threads: int = 0
    # nice added to the encoder's threads (OpenVINO), so clicks' decodes take the cores from background encodes
    encoder_nice: int = 5
    compile_decoder: bool = True  # torch.compile the decoder for common prompt shapes, in the background
    # bfloat16 decoder on a CPU with native bf16: a box's decode 10-16 ms instead of 20-26 (masks: mean Dice 0.995
    # against the reference's on the sample boxes); float32 on a GPU and on CPUs without native bf16
    decoder_bf16: bool = True
    # decoder logit threshold; None: the model's own (LiteMedSAM -1.5, calibrated; SAM family 0)
    mask_threshold: float | None = None
    # continual learning (README: "Continual learning")
    model_dir: str | None = None  # versions, embeddings and downloaded weights; default <app>/model
    # OpenVINO exports of the encoder, named by its weights' digest (apps on one machine may share a folder)
    encoder_export_dir: str | None = None  # default <model_dir>/openvino
    # slice embeddings kept for training and scoring (large and rebuilt at will, unlike versions): a scratch disk
    # will do, and servers of the same images may share one; keyed by encoder weights and volume content
    embeddings_dir: str | None = None  # default <model_dir>/embeddings
    train_every_labels: int = 4  # start a round after this many new final labels (0: off)
    train_interval_minutes: float = 60.0  # ...or this often when any label is new (0: off)
    train_steps: int = 400  # optimiser steps per round (~380 reached 0.8 Dice on the sample data)
    train_encoder_lora: int = 0  # >0: also adapt the image encoder with LoRA of this rank (a GPU feature)
    train_slice_step: int = 2  # train on every n-th labelled slice (1: all; larger: faster rounds)
    gate_tolerance: float = 0.01  # mean Dice a new version may lose against the served one and still be served
    tracking: str = "none"  # none | mlflow
    # active learning (README: "Active learning")
    score_slices: int = 12  # slices per volume the foundation_uncertainty score looks at (per stage)
    lease_minutes: float = 30.0  # an image handed to one annotator is not handed to another for this long (0: off)

    @property
    def model_spec(self) -> ModelSpec:
        """The registry's entry for `model`: the defaults a conf key leaves to the model."""
        return MODEL_REGISTRY[self.model]

    @property
    def decoder_threshold(self) -> float:
        """The mask threshold in force before any trained version calibrates its own."""
        return self.model_spec.mask_threshold if self.mask_threshold is None else self.mask_threshold

    @property
    def roi_slack(self) -> float:
        """How far beyond the roi's in-plane box a propagated mask may reach (fraction of the box a side)."""
        return self.model_spec.roi_slack if self.propagation_roi_slack is None else self.propagation_roi_slack

    def propagation_config(self) -> PropagationConfig:
        """The `foundation` task's 3D propagation, as the server runs it (benchmarks score the same)."""
        return PropagationConfig(
            margin=self.propagation_margin,
            use_mask_prompt=self.propagation_mask_prompt,
            end_taper=self.propagation_end_taper,
            roi_slack=self.roi_slack,
            plane_guide=self.propagation_plane_guide,
            smooth_sigma=self.propagation_smooth,
            planes=self.propagation_planes,
            first_context=self.focus_context,  # the prompted slice gets what 2D would give
            click_corrections=self.click_corrections,
        )

    def service_config(self, encoder_ir_dir: str | None) -> ServiceConfig:
        """The segmentation service as the server runs it (benchmarks that time the engine run the same)."""
        return ServiceConfig(
            cache_bytes=self.cache_mb << 20,
            max_voxels=int(self.max_megavoxels * 1e6),
            volume_bytes=self.volume_cache_mb << 20,
            intensity=IntensityConfig(self.modality, self.ct_window),
            propagation=self.propagation_config(),
            prefetch_slices=self.prefetch_slices,
            encoder_bf16=self.encoder_bf16,
            encoder_runtime=self.encoder_runtime,
            encoder_ir_dir=encoder_ir_dir,
            encoder_threads=self.encoder_threads,
            encoder_nice=self.encoder_nice,
            focus_context=self.focus_context,
            click_corrections=self.click_corrections,
            compile_decoder=self.compile_decoder,
            decoder_bf16=self.decoder_bf16,
            mask_threshold=self.decoder_threshold,
        )

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> AppSettings:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in conf.items():
            if key not in known:
                continue  # MONAI Label's own keys (e.g. server_mode) pass through
            if key in ("model", "device", "modality", "tracking", "encoder_runtime"):
                values[key] = str(raw).strip()
            elif key in ("checkpoint", "model_dir", "encoder_export_dir", "embeddings_dir"):
                values[key] = str(raw).strip() or None
            elif key == "labels":
                values[key] = parse_labels(str(raw))
            elif key in (
                "cache_mb",
                "prefetch_slices",
                "propagation_margin",
                "train_every_labels",
                "train_encoder_lora",
                "volume_cache_mb",
                "background_nice",
                "encoder_threads",
                "encoder_nice",
            ):
                values[key] = _number(key, raw, int, 0 if key != "cache_mb" else 16)
            elif key in ("train_steps", "train_slice_step", "score_slices"):
                values[key] = _number(key, raw, int, 1)
            elif key in ("train_interval_minutes", "gate_tolerance", "lease_minutes"):
                values[key] = _number(key, raw, float, 0.0)
            elif key == "max_megavoxels":
                values[key] = _number(key, raw, float, 0.001)
            elif key == "focus_context":
                values[key] = _number(key, raw, float, 0.0)
            elif key == "mask_threshold":
                values[key] = _number(key, raw, float, -20.0)
            elif key == "propagation_roi_slack":
                values[key] = _number(key, raw, float, -1.0)
            elif key in ("propagation_plane_guide", "propagation_smooth"):
                values[key] = _number(key, raw, float, 0.0)
            elif key == "propagation_planes":
                values[key] = _number(key, raw, int, 1)
                if values[key] not in (1, 3):
                    raise ConfError(f"--conf propagation_planes {raw!r}: expected 1 (axial) or 3 (+ sagittal, coronal)")
            elif key in (
                "propagation_mask_prompt",
                "propagation_end_taper",
                "encoder_bf16",
                "compile_decoder",
                "decoder_bf16",
                "click_corrections",
            ):
                values[key] = _bool(key, raw)
            elif key == "dicomweb_modalities":
                names = tuple(m.strip().upper() for m in str(raw).split(",") if m.strip())
                if not names or not all(m.isalnum() for m in names):
                    raise ConfError(f"--conf dicomweb_modalities {raw!r}: expected modality codes such as CT,MR")
                values[key] = names
            elif key == "ct_window":
                parts = str(raw).split(",")
                if len(parts) != 2:
                    raise ConfError(f"--conf ct_window {raw!r}: expected level,width such as 40,400")
                level, width = (_number(key, p, float, -1e9) for p in parts)
                if width <= 0:
                    raise ConfError(f"--conf ct_window {raw!r}: width must be positive")
                values[key] = (level, width)
        settings = cls(**values)
        if settings.modality.upper() not in ("AUTO", "CT", "MR"):
            raise ConfError(f"--conf modality {settings.modality!r}: expected auto, CT or MR")
        for key in ("background_nice", "encoder_nice"):
            if getattr(settings, key) > 19:
                raise ConfError(f"--conf {key} {getattr(settings, key)}: must be 0..19")
        if settings.encoder_runtime not in RUNTIMES:
            raise ConfError(f"--conf encoder_runtime {settings.encoder_runtime!r}: expected {', '.join(RUNTIMES)}")
        if settings.tracking.lower() not in ("none", "mlflow"):
            raise ConfError(f"--conf tracking {settings.tracking!r}: expected none or mlflow")
        if not (settings.device in ("auto", "cpu", "cuda") or settings.device.startswith("cuda:")):
            raise ConfError(f"--conf device {settings.device!r}: expected auto, cpu, cuda or cuda:N")
        return settings

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfError(f"--conf device {self.device}: no CUDA device is available on this machine")
        return self.device
