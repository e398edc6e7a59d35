"""MONAI Label's local datastore, made safe to hold a team's labels.

MONAI Label's `LocalDatastore` copies an upload over the previous label in place (a crash mid-copy leaves a
torn file and the previous label is gone), rewrites its index `datastore_v2.json` in place (a crash mid-write
leaves a file the server refuses to start with), stores whatever it is sent (a label of another image's shape,
values no model knows) and builds file names from ids and tags as given (`../` leaves the folder). Here:

- an upload is checked first (`lib.datastore.checks`); a bad one gets a 4xx naming the problem and leaves
  nothing behind;
- a label or image is written under a temporary name, flushed and renamed into place, and the index is
  replaced the same way, so after a crash either the old or the new state is there, never half of one;
- nothing is overwritten or deleted: a replaced or removed file is first linked into
  `<studies>/.history/{labels/<tag>,images}/<id>/<time><ext>`, where a team lead can get it back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from lib.atomic import copy_atomic, fsync_dir, remove_stale_temporaries, replace_atomic
from lib.datastore.checks import UploadError, check_image_file, check_label_file, check_name, nifti_extension

logger = logging.getLogger(__name__)

HISTORY_DIR = ".history"


def http_error(error: UploadError) -> HTTPException:
    return HTTPException(status_code=error.status, detail=str(error))


class SafeLocalDatastore(LocalDatastore):
    """A `LocalDatastore` that checks uploads, writes atomically and keeps every replaced file.

    Args:
        studies: the studies folder (`--studies`).
        label_names: the app's labels {name: value}; a label holding any other non-zero value is refused.
        max_voxels: uploads with more voxels are refused (413) before their data is read.
        **kwargs: passed on to `LocalDatastore` (extensions, auto_reload, read_only).
    """

    def __init__(self, studies: str, label_names: dict[str, int], max_voxels: int, **kwargs: Any) -> None:
        self.label_names = dict(label_names)
        self.max_voxels = int(max_voxels)
        super().__init__(studies, **kwargs)
        # temporaries of a writer killed mid-write are never part of the datastore
        remove_stale_temporaries(Path(self._datastore_path).rglob("*.tmp"))
        handler = getattr(self, "_handler", None)  # the folder watcher (auto_reload)
        if handler is not None:
            handler.on_moved = self._on_moved

    def _on_moved(self, event: Any) -> None:
        """An atomic write arrives as a rename (tmp -> name), which MONAI Label's watcher ignores: the index
        rewritten by the scoring subprocess would never be reloaded by the server, so handle it as a change."""
        destination = os.fsdecode(event.dest_path)
        if destination == self._datastore_config_path:
            self._on_modify_event(SimpleNamespace(src_path=destination))
        else:
            self._on_any_event(event)

    # -- where files live -------------------------------------------------------------------------------------

    def _history_path(self, kind: str, item_id: str, extension: str) -> Path:
        folder = Path(self._datastore_path) / HISTORY_DIR / kind / item_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 1_000_000_000:09d}{extension}"

    def _keep(self, path: str | Path, kind: str, item_id: str, extension: str) -> Path | None:
        """Link (or copy) an existing file into the history before it is replaced or removed."""
        path = Path(path)
        if not path.is_file():
            return None
        kept = self._history_path(kind, item_id, extension)
        try:
            os.link(path, kept)
        except OSError:  # another file system: a copy is as good
            copy_atomic(path, kept)
        fsync_dir(kept.parent)
        return kept

    # -- writes -----------------------------------------------------------------------------------------------

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            check_name("label tag", label_tag)
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise UploadError(404, f"unknown image {image_id!r}: not in the datastore")
            extension = nifti_extension(label_filename)
            summary = check_label_file(
                label_filename,
                self.get_image_uri(image_id),
                set(self.label_names.values()),
                self.max_voxels,
                self.label_names,
            )
        except UploadError as error:
            logger.warning("label for %r refused: %s", image_id, error)
            raise http_error(error) from error

        label_dir = Path(self._datastore.label_path(label_tag))
        name = self._filename(image_id, extension)
        with FileLock(self._lock_file):
            label_dir.mkdir(parents=True, exist_ok=True)
            previous = obj.labels.get(label_tag)
            kept = []
            for old_extension in {extension, previous.ext if previous else extension}:
                old = label_dir / self._filename(image_id, old_extension)
                if (copy := self._keep(old, f"labels/{label_tag}", image_id, old_extension)) is not None:
                    kept.append(copy)
            copy_atomic(label_filename, label_dir / name)
            if previous and previous.ext != extension:  # the old file is in the history; one current label only
                (label_dir / self._filename(image_id, previous.ext)).unlink(missing_ok=True)
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name, voxels={str(k): v for k, v in summary.voxels.items()})
            if kept:
                info["previous"] = str(kept[0].relative_to(self._datastore_path))
            obj.labels[label_tag] = DataModel(info=info, ext=extension)
            self._update_datastore_file(lock=False)
        logger.info("saved label %s/%s (%s; previous kept: %s)", label_tag, name, summary.voxels, bool(kept))
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            extension = nifti_extension(os.path.basename(image_filename))
            image_id = check_name("image id", image_id or os.path.basename(image_filename)[: -len(extension)])
            check_image_file(image_filename, self.max_voxels)
        except UploadError as error:
            logger.warning("image %r refused: %s", image_id, error)
            raise http_error(error) from error
        name = self._filename(image_id, extension)
        with FileLock(self._lock_file):
            destination = Path(self._datastore.image_path()) / name
            self._keep(destination, "images", image_id, extension)
            copy_atomic(image_filename, destination)
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=extension))
            self._update_datastore_file(lock=False)
        logger.info("added image %s", name)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            raise HTTPException(404, f"no {label_tag!r} label for image {label_id!r}")
        path = self.get_label_uri(label_id, label_tag)
        self._keep(path, f"labels/{label_tag}", label_id, label.ext)
        super().remove_label(label_id, label_tag)

    def remove_image(self, image_id: str) -> None:
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise HTTPException(404, f"unknown image {image_id!r}: not in the datastore")
        self._keep(self.get_image_uri(image_id), "images", image_id, obj.image.ext)
        super().remove_image(image_id)  # removes its labels through remove_label, which keeps them

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        if not self.datalist():
            raise HTTPException(404, "no image has a final label yet: the dataset archive would be empty")
        return super().get_dataset_archive(limit_cases)

    def _update_datastore_file(self, lock: bool = True) -> None:
        """MONAI Label rewrites its index in place; here it is replaced atomically."""

        def write() -> None:
            self._ignore_event_config = True
            payload = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            replace_atomic(self._datastore_config_path, lambda handle: handle.write(payload))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
