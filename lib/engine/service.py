"""The interactive segmentation service: one model, one embedding cache and one volume store for all users.

Exposes plain verbs (segment, prefetch, stats) in the spirit of nnInteractive's session; MONAI Label adapters
call it, and so can scripts and tests without a server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.engine.auto import AutoConfig, auto_segment
from lib.engine.cache import EmbeddingCache
from lib.engine.interactive import PropagationConfig, VolumeResult, propagate, segment_2d
from lib.engine.predictor import SlicePredictor
from lib.engine.preprocessing import IntensityConfig
from lib.engine.prompts import Prompt
from lib.engine.volumes import DEFAULT_MAX_VOXELS, VolumeStore
from lib.model.registry import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    cache_bytes: int = 1 << 30
    intensity: IntensityConfig = IntensityConfig()
    propagation: PropagationConfig = PropagationConfig()
    prefetch_slices: int = 48
    volumes_in_memory: int = 64  # prepared (uint8) volumes kept, within volume_bytes
    volume_bytes: int = 512 << 20
    max_voxels: int = DEFAULT_MAX_VOXELS  # larger images are refused before their data is read
    encoder_bf16: bool = False
    encoder_runtime: str = "torch"  # torch | openvino | auto (lib.model.runtime)
    encoder_ir_dir: str | None = None  # where OpenVINO exports of the encoder are kept
    encoder_threads: int = 0  # OpenVINO encoder threads (0: torch's)
    encoder_nice: int = 0  # added to the OpenVINO encoder's threads' nice value
    compile_decoder: bool = False
    decoder_bf16: bool = False  # bfloat16 decoder on a CPU with native bf16
    mask_threshold: float = 0.0
    focus_context: float = 3.0  # 2D box prompts are segmented in a window 3x the box (measured +0.06 Dice)
    click_corrections: bool = True  # masks are edited to agree with every click (lib.engine.corrections)


class SegmentationService:
    """Segment 2D/3D from prompts; pre-encode handed-out images in the background without delaying clicks."""

    def __init__(self, model: LoadedModel, config: ServiceConfig = ServiceConfig(), device: str = "cpu") -> None:
        self.config = config
        self.cache = EmbeddingCache(config.cache_bytes)
        self.volumes = VolumeStore(
            config.intensity, config.volumes_in_memory, config.max_voxels, max_bytes=config.volume_bytes
        )
        self.predictor = SlicePredictor(
            model,
            self.cache,
            device=device,
            encode_batch=1,
            encoder_autocast=config.encoder_bf16,
            encoder_runtime=config.encoder_runtime,
            ir_dir=Path(config.encoder_ir_dir) if config.encoder_ir_dir else None,
            encoder_threads=config.encoder_threads,
            encoder_nice=config.encoder_nice,
            compile_decoder=config.compile_decoder,
            decoder_bf16=config.decoder_bf16,
            mask_threshold=config.mask_threshold,
        )
        self._active = 0  # interactive requests in progress; the prefetcher yields to them
        self._active_lock = threading.Lock()
        self._prefetch_queue: queue.Queue[str] = queue.Queue()
        self._prefetcher = threading.Thread(target=self._prefetch_loop, name="prefetch", daemon=True)
        self._prefetcher.start()

    @property
    def model(self) -> LoadedModel:
        return self.predictor.model

    def segment(self, image_path: str, params: dict[str, Any], dimension: int) -> VolumeResult:
        """Validate the prompt against the image and segment in 2D (one slice) or 3D (propagated).

        Raises:
            ImageReadError: the image is missing or unreadable.
            PromptError: the prompt is malformed or outside the image.
        """
        with self._active_lock:
            self._active += 1
        try:
            volume = self.volumes.get(image_path)
            prompt = Prompt.from_request(params, volume.shape)
            if dimension == 2:
                return segment_2d(
                    self.predictor, volume, prompt, self.config.focus_context, self.config.click_corrections
                )
            return propagate(self.predictor, volume, prompt, self.config.propagation)
        finally:
            with self._active_lock:
                self._active -= 1

    def segment_auto(self, image_path: str, label_values: dict[str, int]) -> VolumeResult:
        """Segment every label the served version has learned, without prompts.

        Raises:
            ImageReadError: the image is missing or unreadable.
            NothingLearnedError: no trained version is served yet.
        """
        with self._active_lock:
            self._active += 1
        try:
            return auto_segment(self.predictor, self.volumes.get(image_path), label_values, AutoConfig())
        finally:
            with self._active_lock:
                self._active -= 1

    def use_model(self, model: LoadedModel) -> None:
        """Serve another version of the same base model; cached embeddings stay valid (frozen encoder)."""
        previous = self.model.version
        self.predictor.use_model(model)
        logger.info("now serving %s (was %s)", model.version, previous)

    def prefetch(self, image_path: str) -> None:
        """Queue an image whose middle slices are encoded in the background (an annotator just received it)."""
        if self.config.prefetch_slices > 0:
            self._prefetch_queue.put(image_path)

    def _prefetch_loop(self) -> None:
        while True:
            path = self._prefetch_queue.get()
            try:
                self._prefetch_one(path)
            except Exception:  # noqa: BLE001 - a background helper must never die
                logger.exception("pre-encoding %s failed", path)

    def _prefetch_one(self, path: str) -> None:
        volume = self.volumes.get(path)
        depth = volume.shape[2]
        middle = depth // 2
        order = sorted(range(depth), key=lambda z: (abs(z - middle), z))[: self.config.prefetch_slices]
        begin, done, new = time.perf_counter(), 0, 0
        for z in order:
            while self._active:  # clicks first
                time.sleep(0.02)
            if self.cache.nbytes > 0.9 * self.cache.budget_bytes:
                logger.info("pre-encoding stopped: embedding cache near its budget")
                break
            new += self.predictor.encode(volume, [z])
            done += 1
        logger.info("pre-encoded %d slices of %s (%d new) in %.1f s", done, path, new, time.perf_counter() - begin)

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.model.version,
            "cache": self.cache.stats(),
            "encoded_slices": self.predictor.encoded_slices,
        }
