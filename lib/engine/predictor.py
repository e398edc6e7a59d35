"""A predictor that encodes each slice once and answers many prompts from the cached embedding.

Like `segment_anything.SamPredictor`, but for volumes, shared by all users, and bounded in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.engine.cache import EmbeddingCache
from lib.engine.preprocessing import SliceGeometry, Window
from lib.engine.volumes import PreparedVolume
from lib.model.fast_decoder import FastDecoder, serving_dtype
from lib.model.registry import LoadedModel
from lib.model.runtime import EncoderRuntime, TorchEncoder, low_precision_dtype, make_encoder_runtime

logger = logging.getLogger(__name__)

# Decoder answers remembered per (slice, prompt, model version): ~1 MB each for four candidates on a sample MR.
DECODES_KEPT = 64


@dataclass
class SlicePrediction:
    """One slice's answer.

    Attributes:
        mask: (H, W) bool on the slice grid (rows = y, columns = x).
        low_res_logits: (1, 1, 256, 256) logits, usable as the next mask prompt.
        iou: the decoder's own predicted IoU for the mask.
        window: the focus window it was decoded in (None: the whole slice), which `slice_margin` needs.
    """

    mask: np.ndarray
    low_res_logits: torch.Tensor
    iou: float
    window: Window | None = None


class SlicePredictor:
    """Encodes slices (batched, cached) and decodes prompts against them.

    Args:
        model: the loaded model; its version is part of every cache key.
        cache: shared embedding cache.
        device: torch device for the network.
        encode_batch: slices per encoder call when several are missing.
        storage_dtype: dtype embeddings are cached in (float16 halves the memory at no visible cost).
        encoder_autocast: run the image encoder in bfloat16 (bf16/fp16 on a GPU): 2x faster on CPUs with native
            bf16, but its masks differ from float32's (mean Dice 0.96 on the sample slices, README "Speed").
        encoder_runtime: `torch`, `openvino` (CPU only) or `auto` (OpenVINO on a CPU when installed).
        ir_dir: where the OpenVINO export of each encoder version is kept (None: exported in memory only).
        encoder_threads: OpenVINO inference threads (0: torch's).
        encoder_nice: added to the nice value of the OpenVINO encoder's threads (clicks' decodes go first).
        compile_decoder: compile the mask decoder for the common prompt shapes, in the background (2x faster).
        decoder_bf16: decode in bfloat16 on a CPU with native bf16 (2x faster; float32 elsewhere).
        mask_threshold: logit above which a pixel is in the mask (SAM uses 0; calibrated per model, see README).
    """

    def __init__(
        self,
        model: LoadedModel,
        cache: EmbeddingCache,
        device: str | torch.device = "cpu",
        encode_batch: int = 4,
        storage_dtype: torch.dtype = torch.float16,
        encoder_autocast: bool = False,
        compile_decoder: bool = False,
        decoder_bf16: bool = False,
        mask_threshold: float = 0.0,
        encoder_runtime: str = "torch",
        ir_dir: Path | None = None,
        encoder_threads: int = 0,
        encoder_nice: int = 0,
    ) -> None:
        self.cache = cache
        self.device = torch.device(device)
        self.encode_batch = encode_batch
        self.storage_dtype = storage_dtype
        self.encoder_autocast = encoder_autocast
        self.encoder_runtime = encoder_runtime
        self.ir_dir = ir_dir
        self.encoder_threads = encoder_threads
        self.encoder_nice = encoder_nice
        self._runtime: tuple[str, EncoderRuntime] | None = None  # (encoder version, its runtime)
        self._runtime_lock = threading.Lock()
        self.compile_decoder = compile_decoder
        self.decoder_dtype = serving_dtype(self.device, decoder_bf16)
        self.default_threshold = mask_threshold
        self._warm_up = False  # compiling waits for start_warm_up(): a train subprocess never needs it
        self.use_model(model)
        self._in_flight: dict[tuple, threading.Event] = {}
        self._in_flight_lock = threading.Lock()
        self.encoded_slices = 0
        self.decoder_calls = 0
        self._decoded: OrderedDict[tuple, list[SlicePrediction]] = OrderedDict()
        self._decoded_lock = threading.Lock()

    def use_model(self, model: LoadedModel) -> None:
        """Serve `model` from now on (a new trained version); requests in flight finish with the old one.

        The embedding cache is keyed by the encoder's version, so it stays valid when only the decoder changed.
        """
        decode = FastDecoder(model.network, self.decoder_dtype, compiled=self.compile_decoder)
        if self.compile_decoder and self._warm_up:
            decode.warm_up_in_background()
        threshold = self.default_threshold if model.mask_threshold is None else model.mask_threshold
        # one assignment, so a request never pairs a new decoder with an old threshold
        self._serving = (model, decode, threshold)

    @property
    def decoder(self) -> FastDecoder:
        """The served model's decoder (`FoundationModel.decode`'s arguments, plus the slice's key)."""
        return self._serving[1]

    def start_warm_up(self) -> None:
        """Compile the decoder and prepare the encoder runtime in the background, now and for every model
        served later (server process only)."""
        self._warm_up = True

        def prepare() -> None:
            # one after the other: compiling the decoder while the encoder is being exported to OpenVINO left
            # the compile unfinished, silently, in every server started so far (the decoder stayed eager)
            self.encoder()
            if self.compile_decoder:
                self.decoder.warm_up()

        threading.Thread(target=prepare, name="warm-up", daemon=True).start()

    def encoder(self, wait: bool = True) -> EncoderRuntime:
        """The runtime for the served encoder version, built on first use (an OpenVINO export takes ~10 s).

        wait=False: while another thread builds it, answer with torch eager instead of waiting.
        """
        model = self.model
        current = self._runtime
        if current is not None and current[0] == model.encoder_version:
            return current[1]
        if not self._runtime_lock.acquire(blocking=wait):
            dtype = low_precision_dtype(self.device, self.encoder_autocast)
            return TorchEncoder(model.network.image_encoder, self.device, dtype)
        try:
            current = self._runtime
            if current is None or current[0] != model.encoder_version:
                runtime = make_encoder_runtime(
                    self.encoder_runtime, model.network.image_encoder, model.network.image_size, self.device,
                    self.encoder_autocast, self.ir_dir, self.encoder_threads, self.encoder_nice,
                )  # fmt: skip
                self._runtime = current = (model.encoder_version, runtime)
                logger.info("image encoder %s runs on %s", model.encoder_version, runtime.name)
            return current[1]
        finally:
            self._runtime_lock.release()

    @property
    def model(self) -> LoadedModel:
        return self._serving[0]

    @property
    def mask_threshold(self) -> float:
        return self._serving[2]

    @mask_threshold.setter
    def mask_threshold(self, value: float) -> None:
        self._serving = (self._serving[0], self._serving[1], float(value))

    @property
    def network(self):
        return self.model.network

    def geometry(self, volume: PreparedVolume, window: Window | None = None) -> SliceGeometry:
        x, y, _ = volume.shape
        shape = (y, x) if window is None else (window.side, window.side)
        return SliceGeometry(shape, self.network.image_size)

    @staticmethod
    def _image(volume: PreparedVolume, z: int, window: Window | None) -> np.ndarray:
        image = volume.slice_image(z)
        return image if window is None else window.crop(image)

    def _key(self, volume: PreparedVolume, z: int, window: Window | None = None) -> tuple:
        return (volume.key, int(z), window, self.model.encoder_version)

    def is_encoded(self, volume: PreparedVolume, z: int, window: Window | None = None) -> bool:
        return self._key(volume, z, window) in self.cache

    def _claim(self, keys: list[tuple]) -> tuple[list[tuple], list[threading.Event]]:
        """Split keys into those this thread must encode and events of those another thread is encoding."""
        mine, waits = [], []
        with self._in_flight_lock:
            for key in keys:
                if key in self.cache:
                    continue
                event = self._in_flight.get(key)
                if event is None:
                    self._in_flight[key] = threading.Event()
                    mine.append(key)
                else:
                    waits.append(event)
        return mine, waits

    @torch.no_grad()
    def encode(self, volume: PreparedVolume, slices: Iterable[int], window: Window | None = None) -> int:
        """Make sure the given slices (or a window of them) are in the cache; returns how many were encoded now."""
        geometry = self.geometry(volume, window)
        keys = [self._key(volume, z, window) for z in dict.fromkeys(int(z) for z in slices)]
        mine, waits = self._claim(keys)
        try:
            for start in range(0, len(mine), self.encode_batch):
                batch = mine[start : start + self.encode_batch]
                pixels = geometry.pixels(np.stack([self._image(volume, k[1], window) for k in batch])).to(self.device)
                begin = time.perf_counter()
                embeddings = self.encode_pixels(pixels).to(self.storage_dtype).cpu()
                for key, embedding in zip(batch, embeddings, strict=False):
                    self.cache.put(key, embedding.clone())
                    self._release(key)
                self.encoded_slices += len(batch)
                logger.debug("encoded %d slice(s) in %.2f s", len(batch), time.perf_counter() - begin)
        finally:
            for key in mine:
                self._release(key)
        for event in waits:
            event.wait(timeout=120)
        return len(mine)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels (any device) -> (B, 256, 64, 64) float32 embeddings on the predictor's device."""
        encoder = self.encoder(wait=not self._warm_up)  # the server never holds a click up for an export
        return encoder(self.network.normalize(pixels.to(self.device))).to(self.device)

    def _release(self, key: tuple) -> None:
        with self._in_flight_lock:
            event = self._in_flight.pop(key, None)
        if event is not None:
            event.set()

    def embedding(self, volume: PreparedVolume, z: int, window: Window | None = None) -> torch.Tensor:
        """(1, 256, h, w) float32 embedding of slice z (or a window of it), from the cache or encoded now."""
        key = self._key(volume, z, window)
        cached = self.cache.get(key)
        if cached is None:
            self.encode(volume, [z], window)
            cached = self.cache.get(key)
            if cached is None:  # larger than the whole cache budget: encode without keeping it
                geometry = self.geometry(volume, window)
                cached = self.encode_pixels(geometry.pixels(self._image(volume, z, window)[None]).to(self.device))[0]
        return cached.to(self.device, torch.float32).unsqueeze(0)

    @torch.no_grad()
    def predict(
        self,
        volume: PreparedVolume,
        z: int,
        points_xy: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        window: Window | None = None,
    ) -> SlicePrediction:
        """Segment slice z from a prompt.

        Args:
            points_xy: (K, 2) slice pixel xy; point_labels: (K,) 1 foreground, 0 background.
            box: (4,) x0, y0, x1, y1 inclusive slice pixel bounds.
            mask_input: (1, 1, 256, 256) low-res logits of a neighbouring prediction.
            multimask: ask for three masks and keep the one with the highest predicted IoU (one-click ambiguity).
            window: segment within this focus window of the slice (a zoomed view) instead of the whole slice.
        """
        boxes = None if box is None else np.asarray(box)[None]
        return self.predict_batch(volume, z, points_xy, point_labels, boxes, mask_input, multimask, window)[0]

    @torch.no_grad()
    def predict_batch(
        self,
        volume: PreparedVolume,
        z: int,
        points_xy: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        window: Window | None = None,
    ) -> list[SlicePrediction]:
        """Like `predict`, for B candidate boxes (B, 4) sharing the same points, in one decoder call.

        Answers without a mask prompt are remembered (DECODES_KEPT): a box-trained model's clicks on one slice
        all decode the candidates of its first click, so an annotator's later clicks cost no decoder call.
        """
        model, decode, threshold = self._serving
        if mask_input is not None:  # a neighbour's logits: not worth remembering
            return self._decode(
                decode, threshold, volume, z, points_xy, point_labels, boxes, mask_input, multimask, window
            )
        prompt = tuple(None if a is None else np.asarray(a).tobytes() for a in (points_xy, point_labels, boxes))
        key = (volume.key, int(z), window, model.version, threshold, multimask, *prompt)
        with self._decoded_lock:
            answers = self._decoded.get(key)
            if answers is not None:
                self._decoded.move_to_end(key)
        if answers is None:
            answers = self._decode(
                decode, threshold, volume, z, points_xy, point_labels, boxes, None, multimask, window
            )
            for answer in answers:
                answer.mask.setflags(write=False)  # shared with later callers: edits must copy (they do)
            with self._decoded_lock:
                self._decoded[key] = answers
                while len(self._decoded) > DECODES_KEPT:
                    self._decoded.popitem(last=False)
        # fresh wrappers: callers replace .mask (propagation's roi cut), which must not reach the remembered answer
        return [SlicePrediction(p.mask, p.low_res_logits, p.iou, p.window) for p in answers]

    @torch.no_grad()
    def slice_margin(self, volume: PreparedVolume, prediction: SlicePrediction) -> np.ndarray:
        """(H, W) float32: the prediction's logits on the slice grid minus the mask threshold, so > 0 is its mask
        as decoded (before any roi cut or click edit); -inf outside its focus window. How sure the decoder was
        of each pixel: three-plane fusion weighs the walks' votes by it."""
        geometry = self.geometry(volume, prediction.window)
        logits = geometry.low_res_to_slice(prediction.low_res_logits.float().to(self.device))[0, 0]
        margin = (logits - self._serving[2]).cpu().numpy()
        if prediction.window is None:
            return margin
        x, y, _ = volume.shape
        return prediction.window.paste(margin, (y, x), fill=-np.inf)

    def _decode(
        self,
        decode,
        threshold: float,
        volume: PreparedVolume,
        z: int,
        points_xy: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: torch.Tensor | None,
        multimask: bool,
        window: Window | None,
    ) -> list[SlicePrediction]:
        self.decoder_calls += 1
        geometry = self.geometry(volume, window)
        embedding = self.embedding(volume, z, window)
        if window is not None:
            points_xy = None if points_xy is None else window.to_window(points_xy)
            boxes = None if boxes is None else window.to_window(boxes)
        batch = 1 if boxes is None else len(boxes)
        points = None
        if points_xy is not None and len(points_xy):
            coords = torch.as_tensor(geometry.points(points_xy), device=self.device)[None].expand(batch, -1, -1)
            labels = torch.as_tensor(point_labels, dtype=torch.int64, device=self.device)[None].expand(batch, -1)
            points = (coords, labels)
        box_tensor = None
        if boxes is not None:
            box_tensor = torch.as_tensor(np.stack([geometry.box(b) for b in boxes]), device=self.device)
        if mask_input is not None:
            mask_input = mask_input.to(self.device).expand(batch, -1, -1, -1)
        # the slice's key: clicks on it share the decoder's image-only work (lib.model.fast_decoder)
        key = self._key(volume, z, window)
        logits, iou = decode(embedding, points, box_tensor, mask_input, multimask_output=multimask, image_key=key)
        best = torch.argmax(iou, dim=1) if multimask else torch.zeros(batch, dtype=torch.int64)
        index = torch.arange(batch)
        low_res = logits[index, best][:, None]
        masks = (geometry.low_res_to_slice(low_res)[:, 0] > threshold).cpu().numpy()
        if window is not None:
            x, y, _ = volume.shape
            masks = np.stack([window.paste(m, (y, x)) for m in masks])
        return [
            SlicePrediction(masks[i], low_res[i : i + 1].cpu(), float(iou[i, best[i]]), window) for i in range(batch)
        ]
