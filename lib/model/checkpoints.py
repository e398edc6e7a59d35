"""Find, fetch and verify checkpoints. Weights are data, never code: every load uses `weights_only=True`."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, fetched or trusted; the message says what to do."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where a model's default weights come from.

    Attributes:
        filename: the file name inside the app's model folder.
        url: the official download address, or None when the weights only ship inside a package.
        sha256: the expected digest, when published or pinned; otherwise the digest seen at first download is kept.
        bundled: returns the path of a copy shipped inside an installed package, or None.
        hint: how to obtain the file when nothing above works.
    """

    filename: str
    url: str | None = None
    sha256: str | None = None
    bundled: Callable[[], Path | None] | None = None
    hint: str = ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def download(url: str, destination: Path, expected_sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Download `url` to `destination` atomically, logging progress, and check its SHA-256."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, destination)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                done += len(block)
                if total and done / total >= next_report:
                    logger.info("  %s: %3.0f%% of %.1f MB", destination.name, 100 * done / total, total / 1e6)
                    next_report += 0.1
        actual = digest.hexdigest()
        if expected_sha256 and actual != expected_sha256:
            raise CheckpointError(f"{url}: SHA-256 {actual} does not match the expected {expected_sha256}")
        os.replace(tmp_name, destination)
        destination.with_name(destination.name + ".sha256").write_text(actual + "\n")
        return destination
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise CheckpointError(
            f"cannot download {url} ({error}). This machine may be offline: download the file elsewhere and put it at "
            f"{destination}, or pass `--conf checkpoint /path/to/{destination.name}`."
        ) from error
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def resolve_checkpoint(source: CheckpointSource, model_dir: Path, override: str | None = None) -> Path:
    """Return a local checkpoint path: an explicit path or URL, else the model folder, the bundled copy, the URL."""
    if override:
        if _is_url(override):
            target = model_dir / Path(urllib.request.url2pathname(override.split("?")[0])).name
            return target if target.exists() else download(override, target, None)
        path = Path(override).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        return path
    local = model_dir / source.filename
    if local.is_file():
        return local
    if source.bundled is not None:
        bundled = source.bundled()
        if bundled is not None and bundled.is_file():
            return bundled
    if source.url:
        return download(source.url, local, source.sha256)
    raise CheckpointError(f"no checkpoint for {source.filename}: put it at {local}. {source.hint}".strip())


def verify_checkpoint(path: Path, expected_sha256: str | None) -> str:
    """Return the file's SHA-256; refuse it if it differs from the expected one or from the digest kept at download."""
    actual = file_sha256(path)
    recorded = path.with_name(path.name + ".sha256")
    if expected_sha256 is None and recorded.is_file():
        expected_sha256 = recorded.read_text().strip() or None
    if expected_sha256 and actual != expected_sha256:
        raise CheckpointError(
            f"{path}: SHA-256 {actual} does not match the recorded {expected_sha256}; refusing to load"
        )
    return actual


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load weights only (no pickled code runs); unwrap {'model': ...} / {'state_dict': ...} containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        raise CheckpointError(f"{path} is not a loadable weights-only checkpoint: {error}") from error
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state
