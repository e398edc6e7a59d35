"""MONAI Label train task `foundation`: a thin adapter from the datastore's final labels to a continual round.

MONAI Label runs it in a subprocess (`POST /train/foundation`, or the app's schedule); its log lines are what
`GET /train/` shows. Request params: `steps` (this round only), `rollback` (serve an earlier version instead
of training), `tracking` ("mlflow" logs the round's epochs and metrics to MLflow).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.datastore.checks import UnreadableLabel
from lib.engine.continual import LabelledImage, RoundConfig, RoundError, run_round
from lib.engine.embedding_store import EmbeddingStore
from lib.engine.service import SegmentationService
from lib.model.versions import VersionError, VersionStore

logger = logging.getLogger(__name__)


def labelled_images(datastore: Datastore) -> list[LabelledImage]:
    """Every image with a final label, with the label's save time (so re-submitted labels count as new).

    A label that cannot be read (a SEG in the PACS that does not decode, say) is left out with a warning that
    names it: one bad label must not stop every round."""
    images = []
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL.value)):
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value)
        if not label_id:
            continue
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL.value) or {}
        try:
            label_path = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL.value)
        except UnreadableLabel as error:
            logger.warning("final label %s of %s left out of training: %s", label_id, image_id, error)
            continue
        images.append(LabelledImage(image_id, datastore.get_image_uri(image_id), label_path, float(info.get("ts", 0))))
    return images


class FoundationTrainer(TrainTask):
    def __init__(
        self,
        service: SegmentationService,
        versions: VersionStore,
        labels: dict[str, int],
        config: RoundConfig,
        embeddings_dir: Path,
        tracking: str = "none",
    ) -> None:
        super().__init__(
            "Fine-tunes the served model on every final label (image encoder frozen, embeddings cached): prompted "
            "mode + a prompt-free head for `foundation_auto`; a new version is served only if not worse"
        )
        self.service = service
        self.versions = versions
        self.labels = labels
        self.round_config = config
        self.embeddings_dir = embeddings_dir
        self.tracking = tracking

    def config(self) -> dict[str, Any]:
        return {"steps": self.round_config.train.steps, "rollback": "", "tracking": self.tracking}

    def stats(self) -> dict[str, Any]:
        """Shown in /info/: the served version and every version's metrics."""
        history = self.versions.history()
        return {"served_version": self.versions.served(), "versions": history, "total": len(history)}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        if str(request.get("rollback", "")).strip():
            return self._rollback(request["rollback"])
        config = self.round_config
        if request.get("steps"):
            config = replace(config, train=replace(config.train, steps=int(request["steps"])))
        model = self.service.model
        store = EmbeddingStore.for_model(self.embeddings_dir, model, self.service.predictor.encode_pixels)
        images = labelled_images(datastore)
        try:
            report = run_round(model, images, self.labels, self.versions, store, self.service.volumes, config)
        except RoundError as error:
            logger.warning("no round: %s", error)
            return {"trained": False, "reason": str(error)}
        if str(request.get("tracking", self.tracking)).lower() == "mlflow":
            self._track(report.version, report.metrics)
        return {
            "trained": True,
            "version": report.version,
            "published": report.published,
            "reason": report.reason,
            "validation": report.metrics["validation"],
            "round_seconds": report.metrics["round_seconds"],
        }

    def _rollback(self, value: Any) -> dict[str, Any]:
        try:
            version = int(value)
            self.versions.serve(version, f"rolled back by request from version {self.versions.served()}")
        except (ValueError, VersionError) as error:
            logger.error("rollback refused: %s", error)
            return {"trained": False, "rollback": False, "reason": str(error)}
        return {"trained": False, "rollback": True, "served_version": version}

    def _track(self, version: int, metrics: dict[str, Any]) -> None:
        import mlflow

        # MLflow 3 keeps its file store read-only: a SQLite file beside the versions is the local default
        uri = os.environ.get("MONAI_LABEL_TRACKING_URI") or f"sqlite:///{self.versions.root.parent / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("medfoundation")
        with mlflow.start_run(run_name=f"v{version:04d}"):
            for record in metrics["history"]:
                mlflow.log_metric("loss", record["loss"], step=record["epoch"])
                if record["val_auto_dice"] is not None:
                    mlflow.log_metric("val_auto_dice", record["val_auto_dice"], step=record["epoch"])
            validation = metrics["validation"]
            mlflow.log_metric("val_auto_mean", validation.get("auto_mean") or 0.0)
            mlflow.log_metric("val_prompted_mean", validation.get("prompted_mean") or 0.0)
            mlflow.log_metric("round_seconds", metrics["round_seconds"])
        logger.info("round metrics logged to MLflow at %s", uri)
