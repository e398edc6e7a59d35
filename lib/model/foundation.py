"""One model abstraction for every SAM-family checkpoint: image encoder -> cached embedding -> prompt + mask decoder."""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn


class FoundationModel(nn.Module):
    """A promptable segmentation model in the shape of `segment_anything.modeling.Sam`.

    The state-dict keys are those of SAM, MedSAM, LiteMedSAM and MobileSAM checkpoints
    (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`), so every one loads strictly.

    Args:
        image_encoder: maps (B, 3, S, S) normalised pixels to (B, 256, 64, 64) embeddings (S = image_size).
        prompt_encoder: SAM prompt encoder for points, boxes and low-res mask prompts.
        mask_decoder: SAM mask decoder; returns low-res (B, M, 256, 256) logits and (B, M) predicted IoU.
        image_size: the square encoder input side in pixels.
        pixel_mean, pixel_std: per-channel normalisation applied to [0, 255] RGB input.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self._dense_pe: torch.Tensor | None = None

    def dense_pe(self) -> torch.Tensor:
        """(1, 256, 64, 64) positional encoding of the embedding grid; constant, so computed once per device."""
        reference = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        if self._dense_pe is None or self._dense_pe.device != reference.device:
            # float32 whatever autocast is active: the first caller may be a bfloat16 training step
            with torch.no_grad(), torch.autocast(reference.device.type, enabled=False):
                self._dense_pe = self.prompt_encoder.get_dense_pe().float()
        return self._dense_pe

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """Side of the low-res mask prompt / output: 4x the embedding grid (256x256 for every model here)."""
        h, w = self.prompt_encoder.image_embedding_size
        return 4 * h, 4 * w

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 255] -> encoder input."""
        return (pixels - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 255], already padded to S -> (B, 256, 64, 64) embeddings."""
        return self.image_encoder(self.normalize(pixels))

    def decode(
        self,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_inputs: torch.Tensor | None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder.

        Args:
            embeddings: (1, 256, h, w), one image's embedding; SAM's decoder repeats it for the B prompts.
            points: ((B, N, 2) xy in encoder-input pixels, (B, N) labels 1=fg 0=bg -1=pad) or None.
            boxes: (B, 4) x0, y0, x1, y1 in encoder-input pixels, or None.
            mask_inputs: (B, 1, 256, 256) low-res logits from a previous prediction, or None.
        Returns:
            (B, M, 256, 256) low-res logits and (B, M) predicted IoU; M = 3 if multimask_output else 1.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        return self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
