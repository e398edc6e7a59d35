"""medfoundation: a medical segmentation foundation model served as MONAI Label infer tasks.

    monailabel start_server --app apps/medfoundation --studies <folder or DICOMweb URL> --conf labels a,b,c

Composition only: read the conf, build the model once, hand one segmentation service to every task.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the top-level `lib` package lives beside `apps/`
    sys.path.insert(0, str(REPO_ROOT))

from fastapi import HTTPException  # noqa: E402
from monailabel.config import settings as monailabel_settings  # noqa: E402
from monailabel.datastore.dicom import DICOMWebDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.utils.async_tasks.utils import processes  # noqa: E402

from lib.activelearning.leases import LeaseBook  # noqa: E402
from lib.activelearning.strategies import Diverse, FirstUnlabelled, RandomUnlabelled, Uncertain  # noqa: E402
from lib.datastore.dicomweb import MONAILABEL_SEARCH_FILTER, PacsDatastore, search_filter  # noqa: E402
from lib.datastore.local import SafeLocalDatastore  # noqa: E402
from lib.engine.continual import RoundConfig  # noqa: E402
from lib.engine.service import SegmentationService  # noqa: E402
from lib.engine.training import TrainConfig  # noqa: E402
from lib.engine.uncertainty import ScoreConfig  # noqa: E402
from lib.hardening import install as install_hardening  # noqa: E402
from lib.infers.foundation import FoundationInfer  # noqa: E402
from lib.infers.foundation_auto import FoundationAutoInfer  # noqa: E402
from lib.infers.writer import remove_orphaned_results  # noqa: E402
from lib.model import LoadedModel, build_model  # noqa: E402
from lib.model.versions import VersionStore  # noqa: E402
from lib.scoring.foundation_uncertainty import FoundationUncertainty, descriptor_file  # noqa: E402
from lib.settings import AppSettings  # noqa: E402
from lib.trainers.foundation import FoundationTrainer, labelled_images  # noqa: E402
from lib.trainers.schedule import RetrainSchedule, ScheduleConfig  # noqa: E402

logger = logging.getLogger(__name__)
VERSION = "0.1.0"


def is_background_task() -> bool:
    """True in the subprocess MONAI Label starts for a training round or a scoring run
    (`python -m monailabel.interfaces.utils.app -m train|scoring ...`), False in the server."""
    return sys.argv[0].endswith(os.path.join("monailabel", "interfaces", "utils", "app.py"))


class MedFoundationApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.settings = AppSettings.from_conf(conf or {})
        if is_background_task():  # a training round or scoring run: leave the CPU to the annotators' clicks
            os.nice(self.settings.background_nice)
        device = self.settings.torch_device()
        self.model_dir = Path(self.settings.model_dir or Path(app_dir) / "model")
        self.base_model = build_model(self.settings.model, self.settings.checkpoint, self.model_dir, device)
        self.versions = VersionStore(self.model_dir, self.base_model.base_version)
        self.embeddings_dir = Path(self.settings.embeddings_dir or self.model_dir / "embeddings")
        model = self.load_version(self.versions.served())
        self.schedule: RetrainSchedule | None = None
        self.server_process = False  # True once on_init_complete ran: train/scoring subprocesses never get there
        self.leases = LeaseBook(self.settings.lease_minutes)
        self.service = SegmentationService(
            model,
            self.settings.service_config(self.settings.encoder_export_dir or str(self.model_dir / "openvino")),
            device=device,
        )
        logger.info("medfoundation %s: model %s on %s, labels %s", VERSION, model.version, device, self.settings.labels)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medfoundation",
            description="Medical segmentation foundation model for interactive 2D/3D annotation",
            version=VERSION,
            # /info/'s `labels` as names in index order: OHIF's panel appends to it as to a list (a map made its
            # "connect" fail); each task still lists its {name: index} map
            labels=[name for name, _ in sorted(self.settings.labels.items(), key=lambda item: item[1])],
        )

    def load_version(self, number: int) -> LoadedModel:
        """The base model with a stored version's weights; the base itself if that version cannot be loaded."""
        try:
            return self.base_model.with_version(number, self.versions.load_state(number), self.versions.meta(number))
        except Exception as error:  # noqa: BLE001 - a damaged version must never keep the server from starting
            logger.error("model version %d cannot be served (%s); serving the base model", number, error)
            return self.base_model

    def init_datastore(self) -> Datastore:
        """A local folder gets the checked, atomic, history-keeping datastore; DICOMweb is MONAI Label's with
        its listing and label defects worked around (lib.datastore.dicomweb)."""
        if self.studies.startswith(("http://", "https://")):
            if monailabel_settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER == MONAILABEL_SEARCH_FILTER:  # CT only
                filter_ = search_filter(self.settings.dicomweb_modalities)
                monailabel_settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER = filter_
            store = super().init_datastore()
            if isinstance(store, DICOMWebDatastore):
                store.__class__ = PacsDatastore  # a subclass with no state of its own but the label names
                store.labels = dict(self.settings.labels)
            return store
        return SafeLocalDatastore(
            self.studies,
            self.settings.labels,
            int(self.settings.max_megavoxels * 1e6),
            extensions=monailabel_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=monailabel_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=monailabel_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def model_file(self, model, validate=True):
        """Only `PUT /model/{name}` asks without validating: weights are not uploaded over the served version
        (MONAI Label lets an annotator do that); new weights come from gated training rounds."""
        if not validate:
            raise HTTPException(
                403,
                "model weights cannot be uploaded: versions come from training rounds (POST /train/foundation), "
                "and an earlier one is served again with the `rollback` parameter",
            )
        return super().model_file(model, validate)

    def init_infers(self) -> dict[str, InferTask]:
        return {
            "foundation": FoundationInfer(self.service, 3, self.settings.labels),
            "foundation_2d": FoundationInfer(self.service, 2, self.settings.labels),
            "foundation_auto": FoundationAutoInfer(self.service, self.settings.labels),
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        config = RoundConfig(
            train=TrainConfig(
                steps=self.settings.train_steps,
                slice_step=self.settings.train_slice_step,
                encoder_lora_rank=self.settings.train_encoder_lora,
            ),
            gate_tolerance=self.settings.gate_tolerance,
        )
        trainer = FoundationTrainer(
            self.service,
            self.versions,
            self.settings.labels,
            config,
            self.embeddings_dir,
            self.settings.tracking,
        )
        return {"foundation": trainer}

    def init_strategies(self) -> dict[str, Strategy]:
        served = lambda: self.service.model.number  # noqa: E731
        descriptors = lambda: descriptor_file(self.model_dir, self.service.model.encoder_version)  # noqa: E731
        return {
            "uncertain": Uncertain(self.leases, served),
            "diverse": Diverse(self.leases, served, descriptors),
            "random": RandomUnlabelled(self.leases),
            "first": FirstUnlabelled(self.leases),
        }

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        config = ScoreConfig(slices=self.settings.score_slices, mask_threshold=self.settings.decoder_threshold)
        method = FoundationUncertainty(
            self.service, self.model_dir, self.embeddings_dir, config, self.versions, self.load_version
        )
        return {"foundation_uncertainty": method}

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """Refuse unknown models and images with a 404 naming them, before any work starts."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; available: {', '.join(sorted(self._infers))}")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(400, "'image' must be the id of an image in the datastore")
        if os.path.exists(image):
            if not self._readable_path(image):
                raise HTTPException(404, f"unknown image {image!r}: images are named by their datastore id")
        elif not (datastore or self.datastore()).get_image_uri(image):
            raise HTTPException(404, f"unknown image {image!r}: not in the datastore")
        return super().infer(request, datastore)

    def _readable_path(self, path: str) -> bool:
        """A file path a request may name: in the datastore, an upload MONAI Label put in the temp folder, or an
        image of a session; no other file on the machine (an id or `params` must not read /etc or the models)."""
        real = os.path.realpath(path)
        roots = [self.studies] if not self.studies.startswith(("http://", "https://")) else []
        if self._sessions is not None:
            roots.append(self._sessions.store_path)
        if any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots):
            return True
        upload = os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
        return upload and os.path.basename(real).startswith("tmp") and os.path.isfile(real)

    def on_init_complete(self) -> None:
        """Server process only (not the train or scoring subprocess): leases, scoring, the retraining schedule."""
        self.server_process = True
        from monailabel.app import app as server  # the running FastAPI app (imported by the server already)

        install_hardening(server)
        # a server stopped by a signal exits without its exit handlers (uvicorn re-raises SIGTERM after its own
        # shutdown), so the results folder of the last one is removed here (logged as it goes)
        remove_orphaned_results()
        self.leases.seed(self._handed_out())
        super().on_init_complete()  # starts scoring in the background (MONAI_LABEL_AUTO_UPDATE_SCORING)
        self.service.predictor.start_warm_up()
        self.schedule = RetrainSchedule(
            ScheduleConfig(self.settings.train_every_labels, self.settings.train_interval_minutes),
            new_labels=self._new_labels,
            start_round=lambda: self.async_training("foundation") is not None,
            running=lambda: bool(processes("train")),
            served_changed=self._follow_served_version,
        )
        self.schedule.start()
        logger.info(
            "retraining schedule: every %d new labels or %g min",
            self.settings.train_every_labels,
            self.settings.train_interval_minutes,
        )

    def _new_labels(self) -> set[tuple[str, float]]:
        used = self.versions.meta(self.versions.latest()).get("labels_used", {})
        return {
            (i.image_id, i.label_ts) for i in labelled_images(self.datastore()) if used.get(i.image_id) != i.label_ts
        }

    def _follow_served_version(self) -> None:
        served = self.versions.served()
        if served == self.service.model.number:
            return
        self.service.use_model(self.load_version(served))
        if self._auto_update_scoring:
            self.async_scoring(None)  # a new model changes what is uncertain

    def _handed_out(self) -> list[tuple[str, str, float]]:
        """(image, client, time) of every hand-out MONAI Label recorded in the datastore (leases survive a restart)."""
        datastore = self.datastore()
        records = []
        for image in datastore.get_unlabeled_images():
            for record in (datastore.get_image_info(image).get("strategy") or {}).values():
                if isinstance(record, dict) and record.get("client_id"):
                    records.append((image, str(record["client_id"]), float(record.get("ts", 0))))
        return records

    def async_scoring(self, method, params=None):
        """Only the server starts scoring runs: MONAI Label's train subprocess would start one after every round,
        published or not; the server starts one when it serves a new version."""
        if not self.server_process:
            return {}
        return super().async_scoring(method, params)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """Hand out an image (leased to the asking annotator) and start encoding its middle slices, so the first
        click is fast. Unlike MONAI Label's, this does not start a scoring run per request: scores change when
        the model does, and the server rescores then."""
        name = request.get("strategy") or "random"
        strategy = self._strategies.get(name)
        if strategy is None:
            raise HTTPException(404, f"unknown strategy {name!r}; available: {', '.join(sorted(self._strategies))}")
        result = strategy(request, self.datastore())
        if not result.get("id"):
            return result  # a clear answer (nothing left, or all taken), not an error
        result["path"] = self.datastore().get_image_uri(result["id"])
        if result["path"] and os.path.exists(result["path"]):
            self.service.prefetch(result["path"])
        return result
