"""The foundation model: named builders, checkpoint resolution and verification."""

from lib.model.checkpoints import CheckpointError
from lib.model.foundation import FoundationModel
from lib.model.registry import MODEL_REGISTRY, LoadedModel, ModelSpec, build_model

__all__ = ["MODEL_REGISTRY", "CheckpointError", "FoundationModel", "LoadedModel", "ModelSpec", "build_model"]
