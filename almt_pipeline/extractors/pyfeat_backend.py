"""py-feat backend of the face featurizer: action units, emotions and head pose per frame.

Written against py-feat 2.1.5, whose 68-landmark detector is ``feat.detector.Detectorv1``
(RetinaFace faces -> MobileFaceNet landmarks -> XGBoost AU intensities, ResMaskNet emotions,
landmark-based pose). ``Detectorv1.detect(tensor, data_type="tensor")`` returns a ``Fex`` (a
``pandas.DataFrame`` subclass) with one row per detected face and a ``frame`` column; a frame
without a face contributes one row whose face box is NaN. py-feat needs torchvision and downloads
its weights from the Hugging Face hub on first use, so it is an optional extra.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..config import VisualConfig
from ..errors import ConfigError, DependencyError, ExtractionError
from ..utils import one_line, resolve_device
from .faces import FACE_FLAG, LANDMARK_NAMES, N_LANDMARKS, POSE_NAMES, VisualFeatures, normalise_landmarks

if TYPE_CHECKING:
    import torch

# py-feat's result table: a ``Fex``, i.e. a pandas.DataFrame subclass (pandas has no type stubs here).
Fex = Any


class FexDetector(Protocol):
    """The part of py-feat's ``Detectorv1`` used here: one ``Fex`` table per batch of frames."""

    def detect(self, inputs: torch.Tensor, data_type: str = ..., batch_size: int = ...,
               progress_bar: bool = ..., face_detection_threshold: float = ...) -> Fex: ...


logger = logging.getLogger(__name__)

# py-feat's output columns (feat.utils / feat.pretrained.AU_LANDMARK_MAP["Feat"]).
AU_COLUMNS = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU11", "AU12",
              "AU14", "AU15", "AU17", "AU20", "AU23", "AU24", "AU25", "AU26", "AU28", "AU43"]
EMOTION_COLUMNS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
FACEBOX_COLUMNS = ["FaceRectX", "FaceRectY", "FaceRectWidth", "FaceRectHeight", "FaceScore"]
POSE_COLUMNS = ["Pitch", "Yaw", "Roll"]  # degrees; output as head_pitch/yaw/roll in radians
LANDMARK_COLUMNS = [f"x_{i}" for i in range(N_LANDMARKS)] + [f"y_{i}" for i in range(N_LANDMARKS)]
FRAME_COLUMN = "frame"

NOT_INSTALLED = ("py-feat is not installed: pip install 'almt-pipeline[pyfeat]' (needs torchvision) "
                 "or use the offline landmarks backend (--config default)")


def pyfeat_feature_names(with_landmarks: bool) -> list[str]:
    """face_found, 20 AU intensities, 7 emotion probabilities, head pose [, 136 landmarks]."""
    names = FACE_FLAG + AU_COLUMNS + EMOTION_COLUMNS + POSE_NAMES
    return names + (LANDMARK_NAMES if with_landmarks else [])


def build_pyfeat_detector(device: torch.device | str) -> FexDetector:
    """py-feat's ``Detectorv1`` on ``device`` (identity and gaze models off: not used here)."""
    try:
        from feat.detector import Detectorv1
    except ImportError as e:
        raise DependencyError(NOT_INSTALLED) from e
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision build that does not match torch
        raise DependencyError(f"py-feat failed to import ({type(e).__name__}: {one_line(e)}); "
                              "check that torch and torchvision versions match") from e
    try:
        return Detectorv1(face_model="retinaface", landmark_model="mobilefacenet", au_model="xgb",
                          emotion_model="resmasknet", identity_model=None, gaze_model=None,
                          device=device)
    except Exception as e:  # noqa: BLE001 - hub/network/cache errors come in many types
        raise DependencyError(
            "py-feat could not load its model weights; they download from the Hugging Face hub on "
            f"first use and need internet once (then they are cached): {type(e).__name__}: {one_line(e)}"
        ) from e


def rows_from_fex(fex: Fex, n_frames: int, with_landmarks: bool) -> tuple[np.ndarray, np.ndarray]:
    """py-feat detections for ``n_frames`` frames -> ((n_frames, d) float32, (n_frames,) bool).

    Keeps the largest face of each frame; frames without a valid face box stay zero."""
    needed = [FRAME_COLUMN] + FACEBOX_COLUMNS + AU_COLUMNS + EMOTION_COLUMNS + POSE_COLUMNS
    needed += LANDMARK_COLUMNS if with_landmarks else []
    missing = [c for c in needed if c not in fex.columns]
    if missing:
        raise ExtractionError(f"py-feat output lacks columns {missing[:5]} (expected py-feat 2.1.x)")
    dim = len(pyfeat_feature_names(with_landmarks))
    features = np.zeros((n_frames, dim), dtype=np.float32)  # (T, d)
    found = np.zeros(n_frames, dtype=bool)  # (T,)
    frame = fex[FRAME_COLUMN].to_numpy()
    width = fex["FaceRectWidth"].to_numpy(dtype=np.float64)
    height = fex["FaceRectHeight"].to_numpy(dtype=np.float64)
    area = np.where(np.isfinite(width * height) & (width > 0) & (height > 0), width * height, -1.0)
    for i in range(n_frames):
        candidates = np.flatnonzero((frame == i) & (area > 0))
        if len(candidates) == 0:
            continue
        row = fex.iloc[candidates[np.argmax(area[candidates])]]
        aus = row[AU_COLUMNS].to_numpy(dtype=np.float64)
        emotions = row[EMOTION_COLUMNS].to_numpy(dtype=np.float64)
        pose = np.radians(row[POSE_COLUMNS].to_numpy(dtype=np.float64))
        parts = [[1.0], aus, emotions, pose]
        if with_landmarks:
            xy = row[LANDMARK_COLUMNS].to_numpy(dtype=np.float64)
            pts = np.stack([xy[:N_LANDMARKS], xy[N_LANDMARKS:]], axis=1)  # (68, 2)
            parts.append(normalise_landmarks(pts) if np.all(np.isfinite(pts)) else np.zeros(2 * N_LANDMARKS))
        features[i] = np.nan_to_num(np.concatenate(parts), nan=0.0, posinf=0.0, neginf=0.0)
        found[i] = True
    return features, found


class PyFeatFaceFeaturizer:
    """Face features from py-feat: face flag, 20 AU intensities, 7 emotions, head pose (radians,
    py-feat's signs: +pitch up, +yaw to the subject's right, +roll to the subject's right) and,
    with ``cfg.pyfeat_landmarks``, the 68 landmarks normalised like the ``landmarks`` backend.

    ``detector`` is any object with py-feat's ``detect(inputs, data_type="tensor", ...)``; by
    default py-feat's ``Detectorv1`` is built on first use.
    """

    backend = "pyfeat"

    def __init__(self, cfg: VisualConfig, detector: FexDetector | None = None, batch_size: int = 16,
                 face_threshold: float = 0.5) -> None:
        if batch_size < 1:
            raise ConfigError(f"py-feat batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.fps = float(cfg.fps)
        self.max_side = int(cfg.max_side)
        self.with_landmarks = bool(cfg.pyfeat_landmarks)
        self.batch_size = batch_size
        self.face_threshold = face_threshold
        self.feature_names = pyfeat_feature_names(self.with_landmarks)
        self.dim = len(self.feature_names)
        self._detector = detector

    @property
    def detector(self) -> FexDetector:
        if self._detector is None:
            device = resolve_device(self.cfg.pyfeat_device)
            logger.info("loading py-feat Detectorv1 on %s", device)
            self._detector = build_pyfeat_detector(device)
        return self._detector

    def _prepare(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ExtractionError(f"expected an HxWx3 RGB frame, got an array of shape {frame.shape}")
        h, w = frame.shape[:2]
        scale = self.max_side / max(h, w)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def _run(self, batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8 RGB
        try:
            fex = self.detector.detect(images, data_type="tensor", batch_size=len(batch),
                                       progress_bar=False, face_detection_threshold=self.face_threshold)
        except (DependencyError, ExtractionError):
            raise
        except Exception as e:  # noqa: BLE001 - model failures become one clear line
            raise ExtractionError(f"py-feat detection failed: {type(e).__name__}: {one_line(e)}") from e
        return rows_from_fex(fex, len(batch), self.with_landmarks)

    def __call__(self, frames: Iterable[tuple[float, np.ndarray]]) -> VisualFeatures:
        """Features for a stream of (t_seconds, RGB frame) pairs, run in batches of equal size."""
        feats: list[np.ndarray] = []
        found: list[np.ndarray] = []
        times: list[float] = []
        batch: list[np.ndarray] = []
        for t, frame in frames:
            image = self._prepare(frame)
            if batch and (len(batch) == self.batch_size or image.shape != batch[0].shape):
                f, m = self._run(batch)
                feats.append(f)
                found.append(m)
                batch = []
            batch.append(image)
            times.append(float(t))
        if batch:
            f, m = self._run(batch)
            feats.append(f)
            found.append(m)
        features = np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)  # (T, d)
        face_found = np.concatenate(found) if found else np.zeros(0, bool)  # (T,)
        return VisualFeatures(features=features, face_found=face_found,
                              times=np.asarray(times, np.float32))


__all__ = ["FexDetector", "PyFeatFaceFeaturizer", "build_pyfeat_detector", "pyfeat_feature_names", "rows_from_fex"]
