"""MONAI Label infer task `foundation_auto`: every learned label of a volume, no clicks (a thin adapter)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.engine.auto import NothingLearnedError
from lib.engine.service import SegmentationService
from lib.engine.volumes import ImageReadError
from lib.infers.foundation import image_error, label_response


class FoundationAutoInfer(InferTask):
    """Segmentation-type task: OHIF and Slicer show it as an automatic model ("run" with no prompts).

    Before any trained version is served it answers 409 with what to do, not an empty mask.
    """

    def __init__(self, service: SegmentationService, labels: dict[str, int]) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description="Segments every label the model has learned from submitted labels, with no prompts",
            config={"result_extension": ".nii.gz", "result_compress": True},
        )
        self.service = service

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        begin = time.perf_counter()
        try:
            result = self.service.segment_auto(request.get("image", ""), self.labels)
        except ImageReadError as error:
            raise image_error(error) from error
        except NothingLearnedError as error:
            raise HTTPException(status_code=409, detail=str(error)) from error
        return label_response(result, request, self.service.model.version, begin)
