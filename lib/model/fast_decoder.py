"""The mask decoder as a click runs it: image-only work done once per slice, bfloat16 where the CPU has it,
compiled for the prompt shapes clicks use most.

SAM's decoder (`segment_anything.modeling.MaskDecoder`) is the same math here, regrouped so that what depends on
the slice alone is computed once: with no mask prompt, layer 0's token-to-image keys and values and its
image-to-token queries are projections of the embedding (plus the positional encoding), the same for every prompt
on that slice, about a fifth of a decode's arithmetic. Measured on 2 cores (AVX512_BF16), one box on an encoded slice:
SAM's decode 42-47 ms eager, 31 ms compiled; this path 20-26 ms compiled in float32 (the same answers), 10-16 ms
in bfloat16, whose masks agree with the reference's at mean Dice 0.995 on the sample boxes (README "Speed of the
model").

Compiling takes seconds to a minute a shape, so it never happens on a request: shapes are warmed up in a background
thread at start, and any other shape (e.g. a third click) runs eagerly, in the same precision.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable

import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention
from torch import Tensor

from lib.model.foundation import FoundationModel
from lib.model.runtime import low_precision_dtype

logger = logging.getLogger(__name__)

Signature = tuple[int, int, bool]  # (boxes in the batch, points per prompt, multimask); a mask prompt runs eagerly
# a 2D/3D box, and a click's candidate boxes
DEFAULT_SIGNATURES: tuple[Signature, ...] = ((1, 0, False), (4, 1, False))
SIDES_KEPT = 4  # slices whose image side is kept: 7 MB each in bfloat16 (the one being clicked, and neighbours)

ImageSide = tuple[Tensor, Tensor, Tensor, Tensor]


def serving_dtype(device: torch.device, bf16: bool) -> torch.dtype | None:
    """The decoder's autocast dtype: bfloat16 on a CPU with native bf16 when asked, else None (float32). A GPU
    decodes a box in ~2 ms in float32: low precision is for the CPU, where it halves a click's decode."""
    return low_precision_dtype(device, bf16) if device.type == "cpu" else None


def signature(points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, multimask_output: bool) -> Signature:
    batch = len(boxes) if boxes is not None else (len(points[0]) if points is not None else 1)
    return batch, 0 if points is None else points[0].shape[1], multimask_output


def _attend(attention: Attention, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """SAM's `Attention.forward` after its input projections; a batch of 1 broadcasts against a batch of B.

    queries: (1|B, Nq, D), keys and values: (1|B, Nk, D) projected -> (B, Nq, C) after the output projection.
    """
    q, k, v = (attention._separate_heads(x, attention.num_heads) for x in (queries, keys, values))
    # softmax in float32 whatever the autocast: also keeps the compiler from swapping in its fused attention,
    # which is slower on a CPU for these shapes (7 prompt tokens against 4096 image tokens; 13 vs 9 ms a decode)
    weights = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
    return attention.out_proj(attention._recombine_heads(weights.to(v.dtype) @ v))


def image_side(decoder: MaskDecoder, embedding: Tensor, dense: Tensor, image_pe: Tensor) -> ImageSide:
    """What a decode computes from the slice alone.

    Args:
        embedding: (1, C, h, w) image embedding; dense: (1|B, C, h, w) dense prompt embedding (no-mask or a mask
            prompt's); image_pe: (1, C, h, w) positional encoding.
    Returns:
        image tokens (1|B, N, C) (N = h * w), layer 0's token-to-image keys and values (1|B, N, C / 2) and its
        image-to-token queries (1|B, N, C / 2).
    """
    tokens = (embedding + dense).flatten(2).transpose(1, 2)
    keyed = tokens + image_pe.flatten(2).transpose(1, 2)
    layer = decoder.transformer.layers[0]
    to_image = layer.cross_attn_token_to_image
    return tokens, to_image.k_proj(keyed), to_image.v_proj(tokens), layer.cross_attn_image_to_token.q_proj(keyed)


def predict_masks(
    decoder: MaskDecoder, side: ImageSide, image_pe: Tensor, sparse: Tensor, multimask_output: bool
) -> tuple[Tensor, Tensor]:
    """`MaskDecoder.forward` from an image side: (B, M, 4h, 4w) low-res logits and (B, M) predicted IoU, M = 3
    if multimask_output else 1; only the masks asked for are made.

    image_pe: (1, C, h, w); sparse: (B, T, C) prompt tokens.
    """
    image, keys0, values0, queries0 = side
    side_length = image_pe.shape[-1]
    image_pe = image_pe.flatten(2).transpose(1, 2)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    prompt = torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
    transformer = decoder.transformer
    queries, keys = prompt, image
    for index, layer in enumerate(transformer.layers):  # TwoWayAttentionBlock.forward, layer 0's image side given
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + prompt
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if index == 0:
            image_keys, image_values = keys0, values0
        else:
            image_keys, image_values = to_image.k_proj(keys + image_pe), to_image.v_proj(keys)
        queries = layer.norm2(queries + _attend(to_image, to_image.q_proj(queries + prompt), image_keys, image_values))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + prompt
        image_queries = queries0 if index == 0 else to_token.q_proj(keys + image_pe)
        keys = layer.norm4(keys + _attend(to_token, image_queries, to_token.k_proj(q), to_token.v_proj(queries)))
    q = queries + prompt
    attended = transformer.final_attn_token_to_image(q=q, k=keys + image_pe, v=keys)
    queries = transformer.norm_final_attn(queries + attended)

    batch = queries.shape[0]
    keys = keys.expand(batch, -1, -1)
    grid = keys.transpose(1, 2).reshape(batch, -1, side_length, side_length)
    upscaled = decoder.output_upscaling(grid)
    chosen = range(1, decoder.num_mask_tokens) if multimask_output else range(1)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in chosen], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(queries[:, 0, :])
    return masks, (iou[:, 1:] if multimask_output else iou[:, :1])


class FastDecoder:
    """`FoundationModel.decode` for serving: same arguments and answers, plus `image_key`.

    Args:
        network: the model whose prompt encoder and mask decoder run (its weights, read at each call).
        low_precision: autocast dtype (torch.bfloat16 on a CPU with native bf16) or None for float32.
        compiled: compile `signatures` when `warm_up` runs; until then, and for other shapes, eager.
    """

    def __init__(
        self,
        network: FoundationModel,
        low_precision: torch.dtype | None = None,
        compiled: bool = False,
        signatures: tuple[Signature, ...] = DEFAULT_SIGNATURES,
    ) -> None:
        self.network = network
        self.low_precision = low_precision
        self.signatures = tuple(signatures) if compiled else ()
        self.ready: set[Signature] = set()
        self._sides: OrderedDict[Hashable, ImageSide] = OrderedDict()
        self._sides_lock = threading.Lock()
        self.sides_made = 0
        self._compiled_side = torch.compile(self._image_side, dynamic=False) if compiled else None
        self._compiled_masks = torch.compile(self._masks, dynamic=False) if compiled else None

    def _precision(self):
        if self.low_precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.network.pixel_mean.device.type, dtype=self.low_precision)

    def _no_mask_dense(self) -> Tensor:
        """(1, C, 1, 1) dense prompt embedding of a prompt without a mask; broadcasts over the grid."""
        return self.network.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _image_side(self, embedding: Tensor, dense: Tensor) -> ImageSide:
        with self._precision():
            return image_side(self.network.mask_decoder, embedding, dense, self.network.dense_pe())

    def _masks(
        self, side: ImageSide, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, multimask: bool
    ) -> tuple[Tensor, Tensor]:
        with self._precision():
            sparse, _ = self.network.prompt_encoder(points=points, boxes=boxes, masks=None)
            masks, iou = predict_masks(self.network.mask_decoder, side, self.network.dense_pe(), sparse, multimask)
        return masks.float(), iou.float()

    def warm_up_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.warm_up, name="compile-decoder", daemon=True)
        thread.start()
        return thread

    def warm_up(self) -> None:
        """Compile every signature (seconds to a minute each on 2 cores); a failure leaves the decoder eager."""
        device = self.network.pixel_mean.device
        embedding = torch.zeros(1, 256, 64, 64, device=device)
        side = float(self.network.image_size)
        for batch, n_points, multimask in self.signatures:
            begin = time.perf_counter()
            boxes = torch.tensor([[0.1 * side, 0.1 * side, 0.5 * side, 0.5 * side]], device=device).repeat(batch, 1)
            points = None
            if n_points:
                points = (
                    torch.full((batch, n_points, 2), 0.3 * side, device=device),
                    torch.ones(batch, n_points, dtype=torch.int64, device=device),
                )
            try:
                with torch.no_grad():
                    image = self._compiled_side(embedding, self._no_mask_dense())
                    self._compiled_masks(image, points, boxes, multimask)
            except Exception:  # noqa: BLE001 - no compiler here: keep serving eagerly
                logger.exception("compiling the decoder failed; decoding eagerly")
                return
            self.ready.add((batch, n_points, multimask))
            logger.info(
                "decoder compiled for %d box(es), %d point(s)%s in %.1f s", batch, n_points,
                f" in {self.low_precision}" if self.low_precision else "", time.perf_counter() - begin,
            )  # fmt: skip

    def side(self, embedding: Tensor, image_key: Hashable | None, compiled: bool) -> ImageSide:
        """The no-mask image side of `embedding`, kept under `image_key` (a slice's cache key) when one is given."""
        if image_key is not None:
            with self._sides_lock:
                kept = self._sides.get(image_key)
                if kept is not None:
                    self._sides.move_to_end(image_key)
                    return kept
        made = (self._compiled_side if compiled else self._image_side)(embedding, self._no_mask_dense())
        self.sides_made += 1
        if image_key is not None:
            with self._sides_lock:
                self._sides[image_key] = made
                while len(self._sides) > SIDES_KEPT:
                    self._sides.popitem(last=False)
        return made

    def __call__(
        self,
        embeddings: Tensor,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        mask_inputs: Tensor | None,
        multimask_output: bool = False,
        image_key: Hashable | None = None,
    ) -> tuple[Tensor, Tensor]:
        """As `FoundationModel.decode`; image_key names the slice `embeddings` came from (None: nothing kept).

        embeddings: (1, 256, h, w); points ((B, N, 2), (B, N)), boxes (B, 4) in encoder-input pixels; mask_inputs
        (B, 1, 4h, 4w) -> (B, M, 4h, 4w) low-res logits and (B, M) predicted IoU.
        """
        if mask_inputs is not None:  # the dense embedding is the mask's: nothing is shared between prompts
            with self._precision():
                _, dense = self.network.prompt_encoder(points=None, boxes=None, masks=mask_inputs)
            side = self._image_side(embeddings, dense)
            return self._masks(side, points, boxes, multimask_output)
        compiled = signature(points, boxes, multimask_output) in self.ready
        side = self.side(embeddings, image_key, compiled)
        return (self._compiled_masks if compiled else self._masks)(side, points, boxes, multimask_output)
