"""py-feat backend of the face featurizer: action units, emotions and head pose per frame.

Written against py-feat 2.1.5, whose 68-landmark detector is ``feat.detector.Detectorv1``
(RetinaFace faces -> MobileFaceNet landmarks -> XGBoost AU intensities, ResMaskNet emotions,
landmark pose MLP). Frames come decoded once from the clip (at ``extract.visual.fps``, downscaled
to ``max_side``), go through py-feat in batches of ``pyfeat_batch_size``, and the face detector
runs every ``detect_every`` frames with the largest face tracked in between
(:mod:`.pyfeat_track`). The output names are py-feat's columns.

py-feat needs torchvision, so it is an optional extra, and its weights come from the Hugging Face
hub on first use, or from the folder ``extract.visual.pyfeat_weights`` (:mod:`.pyfeat_weights`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import VisualConfig
from ..errors import ConfigError, DependencyError, ExtractionError
from ..utils import one_line, resolve_device
from .faces import FACE_FLAG, LANDMARK_NAMES, N_LANDMARKS, POSE_NAMES, VisualFeatures, normalise_landmarks
from .pyfeat_track import (
    AU_COLUMNS,
    EMOTION_COLUMNS,
    FACEBOX_COLUMNS,
    FRAME_COLUMN,
    LANDMARK_COLUMNS,
    POSE_COLUMNS,
    DetectorSteps,
    FaceTracker,
)
from .pyfeat_weights import WEIGHTS_ENV, check_weights, missing_message, weights_from

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# py-feat's result table: a ``Fex`` / pandas.DataFrame (pandas has no type stubs here).
Fex = Any

NOT_INSTALLED = ("py-feat is not installed: pip install 'almt-pipeline[pyfeat]' (needs torchvision; "
                 "or `make pyfeat-env` in a source checkout) or use the offline landmarks backend (--config default)")


def pyfeat_feature_names(with_landmarks: bool) -> list[str]:
    """face_found, 20 AU intensities, 7 emotion probabilities, head pose [, 136 landmarks]."""
    names = FACE_FLAG + AU_COLUMNS + EMOTION_COLUMNS + POSE_NAMES
    return names + (LANDMARK_NAMES if with_landmarks else [])


def _load_models(device: torch.device) -> DetectorSteps:
    """Detectorv1 (identity and gaze models off: not used here) and its pose MLP, loaded now."""
    import torch
    from feat.detector import Detectorv1
    from feat.utils.face_pose_mlp import pose_from_landmarks_mlp

    with warnings.catch_warnings():  # "retinaface does not regress pose": the pose MLP does that
        warnings.filterwarnings("ignore", message="face_model='retinaface' does not regress", category=UserWarning)
        detector = Detectorv1(face_model="retinaface", landmark_model="mobilefacenet", au_model="xgb",
                              emotion_model="resmasknet", identity_model=None, gaze_model=None, device=device)
    # py-feat loads the pose MLP on the first face and quietly leaves the pose NaN when it cannot;
    # loading it here makes a missing file an error (and reads it from the weights folder).
    probe = torch.zeros((1, N_LANDMARKS, 2), device=detector.device)
    if pose_from_landmarks_mlp(probe) is None:
        raise OSError("py-feat/pose_mlp_v2 (head pose from landmarks) could not be loaded")
    return detector


def build_pyfeat_detector(device: torch.device | str, weights: str | Path | None = None) -> DetectorSteps:
    """py-feat's ``Detectorv1`` on ``device`` with its weights from ``weights`` (a folder in Hugging
    Face cache layout; None: py-feat's package folder, downloading what is missing)."""
    import torch

    folder = Path(weights).expanduser() if weights else None
    try:
        import feat.detector  # noqa: F401
    except ImportError as e:
        raise DependencyError(NOT_INSTALLED) from e
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision build that does not match torch
        raise DependencyError(f"py-feat failed to import ({type(e).__name__}: {one_line(e)}); "
                              "check that torch and torchvision versions match") from e
    missing = check_weights(folder)  # raises when files are missing and the hub may not be used
    try:
        with weights_from(folder):
            return _load_models(torch.device(device))
    except Exception as e:  # noqa: BLE001 - hub/network/cache errors come in many types
        if missing:
            cause = one_line(e).split(". ")[0]  # hub errors run to several sentences
            why = f"downloading failed: {type(e).__name__}: {cause}"
            raise DependencyError(missing_message(missing, folder, why)) from e
        where = folder if folder is not None else "py-feat's package folder"
        raise DependencyError(f"py-feat could not load its model weights from {where}: "
                              f"{type(e).__name__}: {one_line(e)}") from e


def rows_from_fex(fex: Fex, n_frames: int, with_landmarks: bool) -> tuple[np.ndarray, np.ndarray]:
    """py-feat detections for ``n_frames`` frames -> ((n_frames, d) float32, (n_frames,) bool).

    Keeps the largest face of each frame (by the ``frame`` column); frames without a valid face
    box stay zero."""
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

    ``detector`` is any object with the parts of py-feat's ``Detectorv1`` in
    :class:`~.pyfeat_track.DetectorSteps`; by default ``Detectorv1`` is built on first use, on
    ``cfg.pyfeat_device``, from ``cfg.pyfeat_weights``. After each clip, :attr:`last_stats` holds
    the tracker's counts, :attr:`last_boxes` the face box used in each frame (None: no face) and
    :attr:`last_kinds` how each frame's face was found (see :class:`~.pyfeat_track.FaceTracker`).
    """

    backend = "pyfeat"

    def __init__(self, cfg: VisualConfig, detector: DetectorSteps | None = None, batch_size: int | None = None,
                 face_threshold: float = 0.5) -> None:
        batch_size = cfg.pyfeat_batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ConfigError(f"py-feat batch_size must be >= 1, got {batch_size}")
        if cfg.detect_every < 1:
            raise ConfigError(f"visual.detect_every must be >= 1, got {cfg.detect_every}")
        self.cfg = cfg
        self.fps = float(cfg.fps)
        self.max_side = int(cfg.max_side)
        self.detect_every = int(cfg.detect_every)
        self.with_landmarks = bool(cfg.pyfeat_landmarks)
        self.batch_size = batch_size
        self.face_threshold = face_threshold
        self.feature_names = pyfeat_feature_names(self.with_landmarks)
        self.dim = len(self.feature_names)
        self._detector = detector
        self._tracker: FaceTracker | None = None
        self.last_stats: dict[str, int] = {}
        self.last_boxes: list[np.ndarray | None] = []
        self.last_kinds: list[str] = []

    @property
    def detector(self) -> DetectorSteps:
        if self._detector is None:
            device = resolve_device(self.cfg.pyfeat_device)
            logger.info("loading py-feat Detectorv1 on %s", device)
            # the weights folder is this machine's: ALMT_PYFEAT_WEIGHTS overrides the recorded one
            # (e.g. for `almt predict` with a checkpoint whose features were made elsewhere)
            weights = os.environ.get(WEIGHTS_ENV) or self.cfg.pyfeat_weights
            self._detector = build_pyfeat_detector(device, weights)
        return self._detector

    @property
    def tracker(self) -> FaceTracker:
        if self._tracker is None:
            self._tracker = FaceTracker(self.detector, self.detect_every, self.face_threshold)
        return self._tracker

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
            tables = self.tracker.run(images)
        except (DependencyError, ExtractionError):
            raise
        except Exception as e:  # noqa: BLE001 - model failures become one clear line
            raise ExtractionError(f"py-feat detection failed: {type(e).__name__}: {one_line(e)}") from e
        features = np.zeros((len(batch), self.dim), np.float32)  # (B, d)
        found = np.zeros(len(batch), bool)  # (B,)
        for table in tables:  # each frame is in at most one table
            f, m = rows_from_fex(table, len(batch), self.with_landmarks)
            features[m], found[m] = f[m], True
        return features, found

    def __call__(self, frames: Iterable[tuple[float, np.ndarray]]) -> VisualFeatures:
        """Features for a stream of (t_seconds, RGB frame) pairs, run in batches of equal size."""
        tracker = self.tracker
        tracker.reset()
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
                if image.shape != batch[0].shape:  # boxes do not carry across frame sizes
                    tracker.ref = None
                batch = []
            batch.append(image)
            times.append(float(t))
        if batch:
            f, m = self._run(batch)
            feats.append(f)
            found.append(m)
        features = np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)  # (T, d)
        face_found = np.concatenate(found) if found else np.zeros(0, bool)  # (T,)
        self.last_stats = dict(tracker.stats)
        self.last_boxes = list(tracker.boxes)
        self.last_kinds = list(tracker.kinds)
        logger.debug("pyfeat backend: %s, face in %d/%d frames", self.last_stats, face_found.sum(), len(face_found))
        return VisualFeatures(features=features, face_found=face_found,
                              times=np.asarray(times, np.float32))


__all__ = ["AU_COLUMNS", "EMOTION_COLUMNS", "FACEBOX_COLUMNS", "LANDMARK_COLUMNS", "POSE_COLUMNS",
           "PyFeatFaceFeaturizer", "build_pyfeat_detector", "pyfeat_feature_names", "rows_from_fex"]
