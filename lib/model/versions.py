"""Model versions on disk: every training round's weights and metrics kept, one of them served.

    <model_dir>/versions/v0000/meta.json                 the zero-shot base model (no weights of its own)
    <model_dir>/versions/v0003/{weights.pt, meta.json}   a trained round: decoder + automatic head
    <model_dir>/versions/served.json                     {"version": 3}

A version folder is written under a temporary name, flushed, and renamed into place, and the served pointer
is replaced atomically, so a crash leaves either the old or the new state, never half of one. Weights are
tensors only (loaded with weights_only=True) and their SHA-256 is recorded in meta.json and checked on load.
Nothing is ever deleted: a rejected round is kept with the reason, and any version can be served again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lib.atomic import fsync_dir, remove_stale_temporaries, write_json_atomic
from lib.model.checkpoints import CheckpointError, file_sha256

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^v(\d{4,})$")


class VersionError(ValueError):
    """A version that does not exist or cannot be served; the message says which and why."""


class VersionStore:
    """The versions of one base model.

    Args:
        model_dir: the app's model folder; versions live in `<model_dir>/versions`.
        base_version: the base model's identity (e.g. `lite_medsam@79d8c9dca6db`); version 0 records it, and
            versions trained from another base are refused.
    """

    def __init__(self, model_dir: Path | str, base_version: str) -> None:
        self.root = Path(model_dir) / "versions"
        self.base_version = base_version
        self.root.mkdir(parents=True, exist_ok=True)
        # a version folder or pointer half-written by a writer that died was never visible
        remove_stale_temporaries([*self.root.glob(".tmp-v*-*"), *self.root.glob(".served.json.*.tmp")])
        if not (self.root / "v0000" / "meta.json").exists():
            self._write(0, {"base": base_version, "published": True, "reason": "zero-shot base model"}, None)
        if not (self.root / "served.json").exists():
            write_json_atomic(self.root / "served.json", {"version": 0, "ts": time.time()})

    @staticmethod
    def folder_name(version: int) -> str:
        return f"v{version:04d}"

    def versions(self) -> list[int]:
        numbers = [int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name))]
        return sorted(n for n in numbers if (self.root / self.folder_name(n) / "meta.json").exists())

    def meta(self, version: int) -> dict[str, Any]:
        path = self.root / self.folder_name(version) / "meta.json"
        if not path.exists():
            raise VersionError(f"model version {version} does not exist; known: {self.versions()}")
        return json.loads(path.read_text())

    def history(self) -> list[dict[str, Any]]:
        """Every version's meta (weights digest left out), oldest first, with which one is served."""
        served = self.served()
        rows = []
        for version in self.versions():
            meta = {k: v for k, v in self.meta(version).items() if k != "sha256"}
            meta["served"] = version == served
            rows.append(meta)
        return rows

    def served(self) -> int:
        try:
            return int(json.loads((self.root / "served.json").read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            logger.error("served.json unreadable; serving the base model (version 0)")
            return 0

    def latest(self) -> int:
        return self.versions()[-1]

    def _write(self, version: int, meta: dict[str, Any], state: Mapping[str, Any] | None) -> dict[str, Any]:
        final = self.root / self.folder_name(version)
        if final.exists():
            raise VersionError(f"model version {version} already exists")
        tmp = self.root / f".tmp-{self.folder_name(version)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"version": version, "name": self.folder_name(version), "created": time.time(), **meta}
        if state is not None:
            weights = tmp / "weights.pt"
            torch.save(dict(state), weights)
            with open(weights, "rb") as handle:
                os.fsync(handle.fileno())
            meta["sha256"] = file_sha256(weights)
        write_json_atomic(tmp / "meta.json", meta)
        # Fault injection for the crash tests: hold the half-written version so a kill lands inside the window.
        time.sleep(float(os.environ.get("MEDFOUNDATION_TEST_PAUSE_BEFORE_PUBLISH_S", "0")))
        os.rename(tmp, final)  # atomic: the version appears whole or not at all
        fsync_dir(self.root)
        return meta

    def add(self, state: Mapping[str, Any], meta: dict[str, Any]) -> int:
        """Store a trained round (not yet served); returns its version number."""
        version = self.latest() + 1
        self._write(version, {"base": self.base_version, "published": False, **meta}, state)
        logger.info("stored model version %d", version)
        return version

    def update_meta(self, version: int, **changes: Any) -> None:
        path = self.root / self.folder_name(version) / "meta.json"
        write_json_atomic(path, {**self.meta(version), **changes})

    def load_state(self, version: int) -> dict[str, Any] | None:
        """The version's weights (None for the base), after checking their SHA-256 against meta.json."""
        meta = self.meta(version)
        if meta.get("base") != self.base_version:
            raise VersionError(
                f"model version {version} was trained from {meta.get('base')}, not from the served base "
                f"{self.base_version}"
            )
        if version == 0:
            return None
        weights = self.root / self.folder_name(version) / "weights.pt"
        if not weights.exists():
            raise VersionError(f"model version {version} has no weights file")
        digest = file_sha256(weights)
        if digest != meta.get("sha256"):
            raise CheckpointError(f"model version {version}: weights SHA-256 {digest[:12]} does not match meta.json")
        return torch.load(weights, map_location="cpu", weights_only=True)

    def serve(self, version: int, reason: str) -> None:
        """Make `version` the served one (it must load); the previous pointer is replaced atomically."""
        self.load_state(version)  # refuse a version that cannot be loaded before pointing at it
        write_json_atomic(self.root / "served.json", {"version": version, "ts": time.time(), "reason": reason})
        self.update_meta(version, published=True)
        logger.info("serving model version %d (%s)", version, reason)
