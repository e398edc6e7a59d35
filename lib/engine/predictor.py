"""A predictor that encodes each slice once and answers many prompts from the cached embedding.

Like `segment_anything.SamPredictor`, but for volumes, shared by all users, and bounded in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from lib.engine.cache import EmbeddingCache
from lib.engine.preprocessing import SliceGeometry
from lib.engine.volumes import PreparedVolume
from lib.model.registry import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class SlicePrediction:
    """One slice's answer.

    Attributes:
        mask: (H, W) bool on the slice grid (rows = y, columns = x).
        low_res_logits: (1, 1, 256, 256) logits, usable as the next mask prompt.
        iou: the decoder's own predicted IoU for the mask.
    """

    mask: np.ndarray
    low_res_logits: torch.Tensor
    iou: float


class SlicePredictor:
    """Encodes slices (batched, cached) and decodes prompts against them.

    Args:
        model: the loaded model; its version is part of every cache key.
        cache: shared embedding cache.
        device: torch device for the network.
        encode_batch: slices per encoder call when several are missing.
        storage_dtype: dtype embeddings are cached in (float16 halves the memory at no visible cost).
        encoder_autocast: run the image encoder under bfloat16 autocast (about 2x faster on CPUs with AMX).
    """

    def __init__(
        self,
        model: LoadedModel,
        cache: EmbeddingCache,
        device: str | torch.device = "cpu",
        encode_batch: int = 4,
        storage_dtype: torch.dtype = torch.float16,
        encoder_autocast: bool = False,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.encode_batch = encode_batch
        self.storage_dtype = storage_dtype
        self.encoder_autocast = encoder_autocast
        self._in_flight: dict[tuple, threading.Event] = {}
        self._in_flight_lock = threading.Lock()
        self.encoded_slices = 0

    @property
    def network(self):
        return self.model.network

    def geometry(self, volume: PreparedVolume) -> SliceGeometry:
        x, y, _ = volume.shape
        return SliceGeometry((y, x), self.network.image_size)

    def _key(self, volume: PreparedVolume, z: int) -> tuple:
        return (volume.key, int(z), self.model.version)

    def is_encoded(self, volume: PreparedVolume, z: int) -> bool:
        return self._key(volume, z) in self.cache

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
    def encode(self, volume: PreparedVolume, slices: Iterable[int]) -> int:
        """Make sure the given slices are in the cache; returns how many were encoded now."""
        geometry = self.geometry(volume)
        keys = [self._key(volume, z) for z in dict.fromkeys(int(z) for z in slices)]
        mine, waits = self._claim(keys)
        try:
            for start in range(0, len(mine), self.encode_batch):
                batch = mine[start : start + self.encode_batch]
                pixels = geometry.pixels(np.stack([volume.slice_image(k[1]) for k in batch])).to(self.device)
                begin = time.perf_counter()
                embeddings = self._encode(pixels).to(self.storage_dtype).cpu()
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

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, 256, 64, 64) float32 embeddings."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.encoder_autocast):
            return self.network.encode(pixels).float()

    def _release(self, key: tuple) -> None:
        with self._in_flight_lock:
            event = self._in_flight.pop(key, None)
        if event is not None:
            event.set()

    def embedding(self, volume: PreparedVolume, z: int) -> torch.Tensor:
        """(1, 256, h, w) float32 embedding of slice z, from the cache or encoded now."""
        key = self._key(volume, z)
        cached = self.cache.get(key)
        if cached is None:
            self.encode(volume, [z])
            cached = self.cache.get(key)
            if cached is None:  # larger than the whole cache budget: encode without keeping it
                geometry = self.geometry(volume)
                cached = self._encode(geometry.pixels(volume.slice_image(z)[None]).to(self.device))[0]
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
    ) -> SlicePrediction:
        """Segment slice z from a prompt.

        Args:
            points_xy: (K, 2) slice pixel xy; point_labels: (K,) 1 foreground, 0 background.
            box: (4,) x0, y0, x1, y1 inclusive slice pixel bounds.
            mask_input: (1, 1, 256, 256) low-res logits of a neighbouring prediction.
            multimask: ask for three masks and keep the one with the highest predicted IoU (one-click ambiguity).
        """
        geometry = self.geometry(volume)
        embedding = self.embedding(volume, z)
        points = None
        if points_xy is not None and len(points_xy):
            coords = torch.as_tensor(geometry.points(points_xy), device=self.device)[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int64, device=self.device)[None]
            points = (coords, labels)
        boxes = None if box is None else torch.as_tensor(geometry.box(box), device=self.device)[None]
        if mask_input is not None:
            mask_input = mask_input.to(self.device)
        logits, iou = self.network.decode(embedding, points, boxes, mask_input, multimask_output=multimask)
        best = int(torch.argmax(iou[0])) if multimask else 0
        low_res = logits[:, best : best + 1]
        full = geometry.low_res_to_slice(low_res)[0, 0]
        return SlicePrediction((full > 0).cpu().numpy(), low_res.cpu(), float(iou[0, best]))
