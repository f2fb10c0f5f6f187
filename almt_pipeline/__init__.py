"""almt-pipeline: raw video clips to multimodal sentiment predictions with ALMT.

Library entry points (imported lazily, so ``import almt_pipeline`` stays fast):
``load_config``, ``extract``, ``Predictor``, ``predict``; training lives in
``almt_pipeline.train`` (``train``, ``evaluate``).
"""

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("config", "load_config"),
    "extract": ("extractors.runner", "extract"),
    "Predictor": ("prediction", "Predictor"),
    "predict": ("prediction", "predict"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
