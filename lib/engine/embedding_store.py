"""Slice embeddings kept on disk, so a training round only encodes the volumes labelled since the last one.

A frozen encoder gives the same embedding for the same slice forever; the store is keyed by the encoder's
version and by the volume's content key, and a changed encoder simply starts a new folder.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from lib.engine.preprocessing import SliceGeometry
from lib.engine.volumes import PreparedVolume

if TYPE_CHECKING:
    from lib.model import LoadedModel

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) pixels -> (B, 256, 64, 64) embeddings


class EmbeddingStore:
    """One file per (encoder version, volume): slices (S,), embeddings (S, 256, 64, 64) float16, and the
    encoder's input pixels on the decoder's low-res grid, pixels (S, 256, 256) uint8 (the automatic head's skip).

    Args:
        root: folder of the store (created on demand).
        encoder_version: identifies the encoder weights; part of the folder name.
        encode: the encoder, called on batches of `batch` slices.
        image_size: the encoder's square input side.
    """

    def __init__(
        self, root: Path, encoder_version: str, encode: EncodeFn, image_size: int, low_res: int = 256, batch: int = 4
    ) -> None:
        self.folder = Path(root) / encoder_version.replace("/", "_").replace("@", "-")
        self.encode = encode
        self.image_size = image_size
        self.low_res = low_res
        self.batch = batch
        self.encoded_slices = 0

    @classmethod
    def for_model(cls, root: Path, model: LoadedModel, encode: EncodeFn, batch: int = 4) -> EmbeddingStore:
        """The store of `model`'s encoder at the model's own input and low-res sizes (sizes passed by hand were
        once LiteMedSAM's 256 for MobileSAM's 1024-pixel encoder)."""
        network = model.network
        return cls(root, model.encoder_version, encode, network.image_size, network.mask_input_size[0], batch)

    def _path(self, volume: PreparedVolume) -> Path:
        return self.folder / f"{volume.key}.pt"

    def _load(self, path: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if not path.exists():
            return {}
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
            logger.warning("embedding cache %s unreadable (%s); re-encoding", path.name, error)
            return {}
        slices = saved["slices"].tolist()
        return {int(z): (e, p) for z, e, p in zip(slices, saved["embeddings"], saved["pixels"], strict=True)}

    def _save(self, path: Path, known: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        slices = sorted(known)
        payload = {
            "slices": torch.tensor(slices),
            "embeddings": torch.stack([known[z][0] for z in slices]),
            "pixels": torch.stack([known[z][1] for z in slices]),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @torch.no_grad()
    def embeddings(
        self, volume: PreparedVolume, slices: Sequence[int], progress: Callable[[str], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, 256, 64, 64) float16 embeddings and (S, 256, 256) uint8 pixels of the given slices.

        Only slices not stored yet are encoded.
        """
        path = self._path(volume)
        known = self._load(path)
        missing = [int(z) for z in dict.fromkeys(slices) if int(z) not in known]
        if missing:
            x, y, _ = volume.shape
            geometry = SliceGeometry((y, x), self.image_size)
            begin = time.perf_counter()
            for start in range(0, len(missing), self.batch):
                batch = missing[start : start + self.batch]
                pixels = geometry.pixels(np.stack([volume.slice_image(z) for z in batch]))
                small = low_res_pixels(pixels, self.low_res)
                for z, embedding, image in zip(batch, self.encode(pixels), small, strict=True):
                    known[z] = (embedding.to(torch.float16).cpu(), image)
            self.encoded_slices += len(missing)
            self._save(path, known)
            if progress:
                progress(f"encoded {len(missing)} slices in {time.perf_counter() - begin:.1f} s")
        picked = [known[int(z)] for z in slices]
        return torch.stack([e for e, _ in picked]), torch.stack([p for _, p in picked])


def low_res_pixels(pixels: torch.Tensor, low_res: int) -> torch.Tensor:
    """(B, 3, S, S) encoder input in [0, 255] -> (B, low_res, low_res) uint8 (the decoder's output grid)."""
    gray = pixels[:, :1]
    if gray.shape[-1] != low_res:
        gray = F.interpolate(gray, size=(low_res, low_res), mode="area")
    return gray[:, 0].round().clamp(0, 255).to(torch.uint8)
