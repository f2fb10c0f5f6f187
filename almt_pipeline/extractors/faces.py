"""What the face featurizers share: feature names, the result type, the interface, the dispatcher.

A featurizer (:class:`FaceFeaturizer`) is called on an iterable of
``(t_seconds, HxWx3 uint8 RGB frame)`` pairs (what :func:`almt_pipeline.media.iter_frames`
yields) and returns :class:`VisualFeatures` with one row per frame. Two backends exist:

- ``landmarks`` (default, offline): dlib detector and 68-point landmarks, in
  :mod:`almt_pipeline.extractors.visual`.
- ``pyfeat``: py-feat's action units, emotions and head pose, in
  :mod:`almt_pipeline.extractors.pyfeat_backend`.

Both backends import this module; :func:`make_face_featurizer` finds them through
:data:`BACKENDS` when it is called, so this module never imports a backend.

Landmark numbering is the 68-point iBUG/Multi-PIE scheme (the one OpenFace and py-feat use);
"left"/"right" are the subject's, so "right eye" is points 36-41, on the left of the image.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..config import VisualConfig
from ..errors import ConfigError

# Backend name -> (module of this package, featurizer class), imported on demand.
BACKENDS: dict[str, tuple[str, str]] = {
    "landmarks": (".visual", "LandmarkFaceFeaturizer"),
    "pyfeat": (".pyfeat_backend", "PyFeatFaceFeaturizer"),
}

N_LANDMARKS = 68
EYE_R, EYE_L = slice(36, 42), slice(42, 48)  # subject's right eye = image left

FACE_FLAG = ["face_found"]
BOX_NAMES = ["face_x", "face_y", "face_w", "face_h", "det_score"]
POSE_NAMES = ["head_pitch", "head_yaw", "head_roll"]  # radians, py-feat's signs
LANDMARK_NAMES = [f"lm_x_{i}" for i in range(N_LANDMARKS)] + [f"lm_y_{i}" for i in range(N_LANDMARKS)]


@dataclass
class VisualFeatures:
    """Per-frame face features of one clip."""

    features: np.ndarray  # (T, d) float32, finite; zeros where no face
    face_found: np.ndarray  # (T,) bool
    times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (T,) seconds

    @property
    def face_fraction(self) -> float:
        return float(self.face_found.mean()) if len(self.face_found) else 0.0


class FaceFeaturizer(Protocol):
    """What every backend provides."""

    backend: str
    fps: float
    feature_names: list[str]
    dim: int

    def __call__(self, frames: Iterable[tuple[float, np.ndarray]]) -> VisualFeatures: ...


def make_face_featurizer(cfg: VisualConfig) -> FaceFeaturizer:
    """Build the featurizer named by ``cfg.backend`` (one of :data:`BACKENDS`)."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown visual backend {cfg.backend!r} (use one of {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[cfg.backend]
    module = importlib.import_module(module_name, __package__)
    factory: Callable[[VisualConfig], FaceFeaturizer] = getattr(module, class_name)
    return factory(cfg)


# ----------------------------------------------------------------------------- landmark geometry


def eye_centres(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the subject's right and left eye, each (2,). ``pts`` is (68, 2)."""
    return pts[EYE_R].mean(axis=0), pts[EYE_L].mean(axis=0)


def interocular(pts: np.ndarray) -> float:
    """Distance between the two eye centres, in the units of ``pts`` (68, 2)."""
    right, left = eye_centres(pts)
    return float(np.linalg.norm(left - right))


def normalise_landmarks(pts: np.ndarray) -> np.ndarray:
    """(68, 2) image points -> (136,) [x_0..x_67, y_0..y_67], centred on the landmark mean and
    divided by the inter-ocular distance, so frame position and zoom do not matter."""
    iod = max(interocular(pts), 1e-6)
    centred = (pts - pts.mean(axis=0)) / iod  # (68, 2)
    return np.concatenate([centred[:, 0], centred[:, 1]])
