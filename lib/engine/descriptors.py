"""Each volume's place in the encoder's embedding space, kept in one JSON file beside the model versions.

Written by the scoring task (a subprocess), read by the `diverse` strategy (the server): one atomic file, so
a reader never sees half of it. Descriptors belong to one encoder; a new encoder starts an empty file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class DescriptorFile:
    """{image id: (256,) unit vector} for one encoder version, with the volume key it was computed from."""

    def __init__(self, path: Path, encoder_version: str) -> None:
        self.path = Path(path)
        self.encoder_version = encoder_version
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._entries: dict[str, dict] = {}

    def _refresh(self) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._stamp, self._entries = None, {}
            return
        if stamp == self._stamp:
            return
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:  # a damaged file is rebuilt by the next scoring run
            logger.warning("descriptor file %s unreadable (%s); ignoring it", self.path, error)
            saved = {}
        same_encoder = saved.get("encoder") == self.encoder_version
        self._entries = dict(saved.get("images", {})) if same_encoder else {}
        self._stamp = stamp

    def vectors(self) -> dict[str, np.ndarray]:
        with self._lock:
            self._refresh()
            return {i: np.asarray(e["vector"], np.float32) for i, e in self._entries.items()}

    def key_of(self, image_id: str) -> str | None:
        with self._lock:
            self._refresh()
            return self._entries.get(image_id, {}).get("key")

    def update(self, vectors: dict[str, tuple[str, np.ndarray]]) -> None:
        """Add or replace {image id: (volume key, vector)} and write the file atomically."""
        with self._lock:
            self._refresh()
            for image_id, (key, vector) in vectors.items():
                self._entries[image_id] = {"key": key, "vector": [round(float(v), 5) for v in vector]}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"encoder": self.encoder_version, "images": self._entries}))
            os.replace(tmp, self.path)
            self._stamp = self.path.stat().st_mtime_ns
