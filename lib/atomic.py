"""Writes that a crash cannot tear: write a temporary beside the target, flush it to disk, rename it into place.

Temporary names carry the writer's PID (`.<name>.<pid>.tmp`, `.tmp-<name>-<pid>`), so that what a killed
writer left behind can be told from what a live one is writing, and removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def copy_atomic(source: str | Path, destination: str | Path) -> None:
    """Copy `source` to `destination` so that `destination` is either its old self or the whole new file."""
    destination = Path(destination)
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(destination.parent)


def writer_alive(pid: int) -> bool:
    """Whether process `pid` may still be writing (a killed one lingers as a zombie until it is reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
