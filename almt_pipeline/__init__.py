"""almt-pipeline: raw video clips to multimodal sentiment predictions with ALMT.

Library entry points (imported lazily, so ``import almt_pipeline`` stays fast):
``load_config``, ``extract``, ``Predictor``, ``predict``; training lives in
``almt_pipeline.train`` (``train``) and scoring in ``almt_pipeline.evaluate`` (``evaluate``).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers (nothing is imported at run time)
    from .config import load_config as load_config
    from .extractors.runner import extract as extract
    from .prediction import Predictor as Predictor
    from .prediction import predict as predict

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("config", "load_config"),
    "extract": ("extractors.runner", "extract"),
    "Predictor": ("prediction", "Predictor"),
    "predict": ("prediction", "predict"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
