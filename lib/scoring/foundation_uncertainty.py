"""MONAI Label scoring method `foundation_uncertainty`: a thin adapter around lib.engine.uncertainty.

MONAI Label runs it in a subprocess (`POST /scoring/foundation_uncertainty`, at server start, and after each
published version); its log lines are what `GET /scoring/` shows. Each unlabelled image gets, in its
datastore info under `foundation_uncertainty`: the score, per-label scores, the parts, the model version
and the slices used. An image already scored by the served version is skipped (request `force` to redo).
Before any label is learned the score is the cold start's (distance in embedding space).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.activelearning.strategies import SCORE_KEY, reload
from lib.engine.descriptors import DescriptorFile
from lib.engine.service import SegmentationService
from lib.engine.uncertainty import (
    ScoreConfig,
    cold_start_scores,
    default_views,
    describe_volume,
    score_volume,
    view_stores,
)
from lib.engine.volumes import ImageReadError
from lib.model.registry import LoadedModel
from lib.model.versions import VersionError, VersionStore

logger = logging.getLogger(__name__)


def descriptor_file(model_dir: Path, encoder_version: str) -> DescriptorFile:
    return DescriptorFile(Path(model_dir) / "descriptors.json", encoder_version)


class FoundationUncertainty(ScoringMethod):
    def __init__(
        self,
        service: SegmentationService,
        model_dir: Path,
        embeddings_dir: Path,
        config: ScoreConfig,
        versions: VersionStore,
        load_version: Callable[[int], LoadedModel],
    ) -> None:
        super().__init__(
            "How unsure the served foundation model is about each unlabelled image: disagreement under test-time "
            "shifts/intensity changes and jittered boxes, the decoder's predicted IoU, entropy, and disagreement "
            "with the previous version; before any training, distance in embedding space (cold start)"
        )
        self.service = service
        self.model_dir = Path(model_dir)  # the descriptors file
        self.embeddings_dir = Path(embeddings_dir)
        self.config = config
        self.versions = versions
        self.load_version = load_version

    def info(self) -> dict[str, Any]:
        return {**super().info(), "key": SCORE_KEY, "slices": self.config.slices}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        begin = time.perf_counter()
        model = self.service.model
        force = str(request.get("force", "")).lower() in ("1", "true", "yes")
        network = model.network
        config = ScoreConfig(
            slices=self.config.slices,
            mask_threshold=model.mask_threshold if model.mask_threshold is not None else self.config.mask_threshold,
        )
        views = default_views(config, network.image_size, network.mask_input_size[0])
        stores = view_stores(
            self.embeddings_dir,
            model.encoder_version,
            self.service.predictor.encode_pixels,
            network.image_size,
            network.mask_input_size[0],
            views,
        )
        descriptors = descriptor_file(self.model_dir, model.encoder_version)
        previous = self._previous(model)
        reload(datastore)
        images = sorted(datastore.list_images())
        unlabelled = set(datastore.get_unlabeled_images())
        logger.info(
            "foundation_uncertainty: %d images (%d unlabelled) with model %s%s",
            len(images),
            len(unlabelled),
            model.version,
            "" if model.auto_head is not None else " (nothing learned yet: cold start from embeddings)",
        )
        scored, skipped, failed = 0, 0, []
        pending: dict = {}  # descriptors are written in batches: the file holds every image's
        for n, image in enumerate(images, start=1):
            if len(pending) >= 16:
                descriptors.update(pending)
                pending.clear()
            try:
                volume = self.service.volumes.get(datastore.get_image_uri(image))
            except ImageReadError as error:
                logger.warning("foundation_uncertainty: %s skipped: %s", image, error)
                failed.append(image)
                continue
            stored = datastore.get_image_info(image).get(SCORE_KEY) or {}
            current = (
                stored.get("model") == model.version
                and stored.get("volume") == volume.key
                and stored.get("method") == "model"
            )
            if image not in unlabelled or model.auto_head is None or (current and not force):
                if descriptors.key_of(image) != volume.key:
                    pending[image] = (volume.key, describe_volume(volume, stores["identity"], config))
                    logger.info("foundation_uncertainty: %d/%d %s described (embedding space)", n, len(images), image)
                skipped += image in unlabelled and current
                continue
            result = score_volume(model, volume, stores, views, config, previous)
            pending[image] = (volume.key, result.descriptor)
            self._store(datastore, image, {
                "score": result.score, "labels": result.labels, "parts": result.parts, "method": "model",
                "version": model.number, "model": model.version, "volume": volume.key, "slices": result.slices,
                "seconds": round(result.seconds, 1), "ts": int(time.time()),
            })  # fmt: skip
            scored += 1
            logger.info(
                "foundation_uncertainty: %d/%d %s score %.3f (%.1f s)", n, len(images), image, result.score,
                result.seconds,
            )  # fmt: skip
        if pending:
            descriptors.update(pending)
        if model.auto_head is None:
            vectors = descriptors.vectors()
            known = {i: v for i, v in vectors.items() if i in images}
            for image, cold in cold_start_scores(known, set(images) - unlabelled).items():
                self._store(datastore, image, {
                    **cold, "method": "cold_start", "version": model.number, "model": model.version,
                    "volume": descriptors.key_of(image), "ts": int(time.time()),
                })  # fmt: skip
                scored += 1
            logger.info("foundation_uncertainty: cold-start scores for %d unlabelled images", len(unlabelled))
        seconds = round(time.perf_counter() - begin, 1)
        logger.info(
            "foundation_uncertainty: %d scored, %d already current, %d unreadable in %.0f s",
            scored,
            skipped,
            len(failed),
            seconds,
        )
        return {"scored": scored, "skipped": skipped, "failed": failed, "version": model.number, "seconds": seconds}

    def _previous(self, model: LoadedModel) -> LoadedModel | None:
        """The version this one was trained from, when it has an automatic head (its disagreement is a part)."""
        if model.number == 0:
            return None
        try:
            parent = int(self.versions.meta(model.number).get("parent") or 0)
        except VersionError:
            return None
        return self.load_version(parent) if parent else None

    @staticmethod
    def _store(datastore: Datastore, image: str, value: dict[str, Any]) -> None:
        reload(datastore)  # the server may have saved a label since: write on top of the newest file
        datastore.update_image_info(image, {SCORE_KEY: value})
