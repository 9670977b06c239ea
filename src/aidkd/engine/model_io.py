"""Re-exports for code written before the weights module: use ``aidkd.models`` (``load_detector``,
``save_model_file``, ``model_meta``; they live in ``aidkd.models.build`` / ``aidkd.models.weights``)."""
from aidkd.models.build import load_detector
from aidkd.models.weights import MODEL_FORMAT, model_meta, save_model_file

__all__ = ["MODEL_FORMAT", "load_detector", "model_meta", "save_model_file"]
