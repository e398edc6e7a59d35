"""MONAI Label infer tasks `foundation` (3D) and `foundation_2d` (2D): thin adapters over the engine's service."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.engine.interactive import VolumeResult
from lib.engine.prompts import PromptError
from lib.engine.service import SegmentationService
from lib.engine.volumes import ImageReadError, ImageTooLarge
from lib.infers.writer import write_label

logger = logging.getLogger(__name__)


class FoundationInfer(InferTask):
    """Deepgrow-type task, so OHIF's point-prompt panel and Slicer's SmartEdit tools offer it.

    Request params (what the clients send): `foreground`, `background` ([[x, y, z], ...] voxels),
    `roi` ([x0, x1, y0, y1, z0, z1] voxels), `slice`, `label`; and the result format keys
    `result_extension` (.nii.gz | .nii | .nrrd), `result_compress`, `result_dtype`.
    """

    def __init__(self, service: SegmentationService, dimension: int, labels: dict[str, int]) -> None:
        what = "the prompted slice" if dimension == 2 else "the prompted slice, propagated through the roi / structure"
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=dimension,
            description=f"{service.model.spec.description}: segments {what} from clicks or a box",
            config={"result_extension": ".nii.gz", "result_compress": True},
        )
        self.service = service

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        begin = time.perf_counter()
        try:
            result = self.service.segment(request.get("image", ""), request, self.dimension)
        except ImageReadError as error:
            raise image_error(error) from error
        except PromptError as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        path, info = label_response(result, request, self.service.model.version, begin)
        if request.get("label"):
            info["label_names"] = {str(request["label"]): 1}
        return path, info


def image_error(error: ImageReadError) -> HTTPException:
    """404 for a missing image, 413 for one over the size limit, 422 for one that cannot be read."""
    if isinstance(error, ImageTooLarge):
        return HTTPException(status_code=413, detail=str(error))
    return HTTPException(status_code=404 if "not found" in str(error) else 422, detail=str(error))


def label_response(
    result: VolumeResult, request: dict[str, Any], model_version: str, begin: float
) -> tuple[str, dict[str, Any]]:
    """Write the label in the format the request asks for; (path, info) as MONAI Label's infer returns them."""
    try:
        path = write_label(
            result.mask,
            result.affine,
            extension=str(request.get("result_extension") or ".nii.gz"),
            compress=str(request.get("result_compress", True)).lower() not in ("false", "0"),
            dtype=str(request.get("result_dtype") or "uint8"),
        )
    except ValueError as error:
        raise HTTPException(status_code=400, detail=str(error)) from error
    info = dict(result.info)
    info.update(model_version=model_version, latency=round(time.perf_counter() - begin, 4))
    return path, info
