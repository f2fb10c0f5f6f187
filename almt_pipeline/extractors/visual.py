"""Landmarks face backend: dlib's detector, 68-point landmarks and the geometry built on them.

dlib's HOG frontal face detector and the 68-point shape predictor shipped in the
``face-recognition-models`` wheel, fully offline. Per frame: face flag, face box, detector score,
head pose from the landmarks (PnP on a generic 3-D face), geometric expression measures and the
68 landmarks normalised for position and scale. The detector runs every ``detect_every`` frames;
in between, landmarks are fitted in a box derived from the previous frame's landmarks, with a
re-detection whenever tracking fails.

Frames without a face are all zeros with the face flag 0. When several faces are visible the
largest one is used. The interface, result type and the names shared with the py-feat backend
live in :mod:`almt_pipeline.extractors.faces`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import VisualConfig
from ..errors import ConfigError, DependencyError, ExtractionError
from ..utils import one_line
from .faces import (
    BOX_NAMES,
    EYE_L,
    EYE_R,
    FACE_FLAG,
    LANDMARK_NAMES,
    POSE_NAMES,
    VisualFeatures,
    eye_centres,
    interocular,
    normalise_landmarks,
)

if TYPE_CHECKING:
    import dlib

logger = logging.getLogger(__name__)

SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"

# 68-point scheme indices (subject's right = image left).
JAW = slice(0, 17)
BROW_R, BROW_L = slice(17, 22), slice(22, 27)
CHIN, NOSE_ROOT, NOSE_TIP, NOSE_BASE = 8, 27, 30, 33
NOSE_WING_R, NOSE_WING_L = 31, 35
BROW_R_INNER, BROW_L_INNER = 21, 22
EYE_R_OUTER, EYE_R_INNER, EYE_L_INNER, EYE_L_OUTER = 36, 39, 42, 45
MOUTH_R, MOUTH_L = 48, 54  # lip corners
UPPER_LIP_TOP, LOWER_LIP_BOTTOM = 51, 57
INNER_UPPER_LIP, INNER_LOWER_LIP = 62, 66

# Generic 3-D face for head pose (millimetres, origin at the nose tip). Axes follow the camera of
# a frontal face: X towards the image right (subject's left), Y down, Z away from the camera.
# Rounded adult averages from facial anthropometry (Farkas): biocular width ex-ex ~90 mm,
# intercanthal width en-en ~32 mm (eye centres ~61 mm apart), mouth width ch-ch ~50 mm, eye
# line ~35 mm above the nose tip, subnasale ~8 mm below and ~15 mm behind it, stomion ~20 mm
# below subnasale, chin (gnathion) ~65 mm below subnasale; the eye corners sit 28-40 mm and
# the lip corners ~30 mm behind the nose tip.
FACE_MODEL_3D: dict[int, tuple[float, float, float]] = {
    NOSE_TIP: (0.0, 0.0, 0.0),
    NOSE_BASE: (0.0, 8.0, 15.0),
    NOSE_ROOT: (0.0, -36.0, 20.0),
    CHIN: (0.0, 73.0, 25.0),
    EYE_R_OUTER: (-45.0, -35.0, 40.0),
    EYE_R_INNER: (-16.0, -35.0, 28.0),
    EYE_L_INNER: (16.0, -35.0, 28.0),
    EYE_L_OUTER: (45.0, -35.0, 40.0),
    MOUTH_R: (-25.0, 28.0, 30.0),
    MOUTH_L: (25.0, 28.0, 30.0),
}
POSE_POINTS = np.array(list(FACE_MODEL_3D), dtype=np.int64)
POSE_MODEL = np.array(list(FACE_MODEL_3D.values()), dtype=np.float64)  # (P, 3)

EXPRESSION_NAMES = [
    "mouth_open",          # inner-lip gap (62-66): jaw drop / lips part (AU25/26)
    "mouth_width",         # lip-corner distance (48-54): lip-corner pull (AU12) / stretch (AU20)
    "lip_corner_raise",    # corners above the inner-lip centre > 0 (smile), below < 0 (frown, AU15)
    "upper_lip_raise",     # nose base to top of upper lip (33-51); smaller when raised (AU10)
    "lip_thickness",       # visible red lip height; thinner when pressed (AU23/24)
    "jaw_drop",            # nose base to chin (33-8) (AU26/27)
    "brow_raise_right",    # brow (17-21 mean) above the right eye centre (AU1+2)
    "brow_raise_left",     # brow (22-26 mean) above the left eye centre
    "inner_brow_raise_right",  # inner brow 21 above inner eye corner 39 (AU1)
    "inner_brow_raise_left",   # inner brow 22 above inner eye corner 42
    "brow_furrow",         # inner brow distance (21-22); smaller when furrowed (AU4)
    "eye_open_right",      # eye aspect ratio of 36-41 (AU5 up, AU7/43 down)
    "eye_open_left",       # eye aspect ratio of 42-47
    "nose_wrinkle",        # nose wings (31, 35) to inner eye corners; shorter in AU9
    "nose_width",          # nose wing distance (31-35); wider in AU9/AU10
]
LANDMARKS_FEATURE_NAMES = FACE_FLAG + BOX_NAMES + POSE_NAMES + EXPRESSION_NAMES + LANDMARK_NAMES


# ----------------------------------------------------------------------------- geometry helpers


def upright_face(pts: np.ndarray) -> np.ndarray:
    """(68, 2) points rotated so the eye line is horizontal, centred, in inter-ocular units."""
    right, left = eye_centres(pts)
    d = left - right
    iod = max(float(np.hypot(d[0], d[1])), 1e-6)
    c, s = d[0] / iod, d[1] / iod  # cos / sin of the in-plane eye-line angle
    rot = np.array([[c, s], [-s, c]])  # rotates by minus that angle
    return (pts - pts.mean(axis=0)) @ rot.T / iod


def eye_aspect_ratio(eye: np.ndarray) -> float:
    """Eye opening of a 6-point eye contour (corner, 2 upper, corner, 2 lower): vertical / width."""
    vertical = np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])
    return float(vertical / (2.0 * max(float(np.linalg.norm(eye[0] - eye[3])), 1e-6)))


def expression_measures(pts: np.ndarray) -> np.ndarray:
    """Geometric expression measures of :data:`EXPRESSION_NAMES` from (68, 2) image points.

    Distances are in inter-ocular units in the roll-corrected face frame (y grows downwards)."""
    u = upright_face(pts)  # (68, 2)
    y = u[:, 1]

    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(u[a] - u[b]))

    mouth_centre_y = 0.5 * (y[INNER_UPPER_LIP] + y[INNER_LOWER_LIP])
    corners_y = 0.5 * (y[MOUTH_R] + y[MOUTH_L])
    eye_r_y, eye_l_y = y[EYE_R].mean(), y[EYE_L].mean()
    wings_to_eyes = 0.5 * (dist(NOSE_WING_R, EYE_R_INNER) + dist(NOSE_WING_L, EYE_L_INNER))
    values = [
        dist(INNER_UPPER_LIP, INNER_LOWER_LIP),
        dist(MOUTH_R, MOUTH_L),
        mouth_centre_y - corners_y,
        y[UPPER_LIP_TOP] - y[NOSE_BASE],
        (y[INNER_UPPER_LIP] - y[UPPER_LIP_TOP]) + (y[LOWER_LIP_BOTTOM] - y[INNER_LOWER_LIP]),
        y[CHIN] - y[NOSE_BASE],
        eye_r_y - y[BROW_R].mean(),
        eye_l_y - y[BROW_L].mean(),
        y[EYE_R_INNER] - y[BROW_R_INNER],
        y[EYE_L_INNER] - y[BROW_L_INNER],
        dist(BROW_R_INNER, BROW_L_INNER),
        eye_aspect_ratio(pts[EYE_R]),
        eye_aspect_ratio(pts[EYE_L]),
        wings_to_eyes,
        dist(NOSE_WING_R, NOSE_WING_L),
    ]
    return np.asarray(values, dtype=np.float64)


def rotation_to_pose(rot: np.ndarray) -> tuple[float, float, float]:
    """Rotation matrix (model -> camera, axes x right, y down, z forward) to (pitch, yaw, roll)
    in radians, decomposed as R = Rz(roll') Ry(yaw) Rx(pitch').

    Signs follow py-feat: pitch > 0 = head up, yaw > 0 = turned to the subject's right (nose to
    the image left), roll > 0 = tilted to the subject's right (top of the head to the image left).
    """
    yaw = math.asin(max(-1.0, min(1.0, -rot[2, 0])))
    pitch_down = math.atan2(rot[2, 1], rot[2, 2])
    roll_cw = math.atan2(rot[1, 0], rot[0, 0])
    return -pitch_down, yaw, -roll_cw


def pose_to_rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """Inverse of :func:`rotation_to_pose` (used to check it)."""
    a, b, c = -pitch, yaw, -roll
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def camera_matrix(width: int, height: int, centre: np.ndarray) -> np.ndarray:
    """Pinhole camera: focal length = the longer frame side (~53 degree field of view, typical of
    webcams and phones), no distortion, principal point at ``centre`` (2,)."""
    f = float(max(width, height))
    return np.array([[f, 0.0, centre[0]], [0.0, f, centre[1]], [0.0, 0.0, 1.0]])


def head_pose(pts: np.ndarray, width: int, height: int) -> tuple[float, float, float] | None:
    """(pitch, yaw, roll) in radians from (68, 2) image points, or None if PnP fails.

    The principal point is put at the face centre, so the pose is measured against the line of
    sight from the camera to the face: a face looking into the lens reads (0, 0, 0) wherever it
    is in the frame."""
    import cv2

    image_points = np.ascontiguousarray(pts[POSE_POINTS], dtype=np.float64)  # (P, 2)
    cam = camera_matrix(width, height, pts.mean(axis=0))
    ok, rvec, tvec = cv2.solvePnP(POSE_MODEL, image_points, cam, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or not np.all(np.isfinite(rvec)) or float(tvec[2, 0]) <= 0:
        return None
    rot, _ = cv2.Rodrigues(rvec)
    return rotation_to_pose(rot)


# ----------------------------------------------------------------------------- landmarks backend


def shape_predictor_path() -> Path:
    """The 68-point model inside the ``face-recognition-models`` wheel, found without importing
    the package (its ``__init__`` needs ``pkg_resources``, which recent setuptools dropped)."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError) as e:
        spec = None
        logger.debug("find_spec(face_recognition_models) failed: %s", e)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "models" / SHAPE_PREDICTOR_FILE for p in spec.submodule_search_locations]
    if not candidates:
        try:
            candidates.append(Path(str(importlib.resources.files("face_recognition_models"))) / "models"
                              / SHAPE_PREDICTOR_FILE)
        except Exception as e:  # noqa: BLE001 - any failure here means "not installed"
            logger.debug("importlib.resources lookup failed: %s", e)
    for path in candidates:
        if path.is_file():
            return path
    raise DependencyError(
        f"dlib's 68-point landmark model ({SHAPE_PREDICTOR_FILE}) was not found: "
        "pip install face-recognition-models (or use --visual-backend pyfeat)"
    )


def _largest(rects: Sequence[dlib.rectangle], scores: Sequence[float]) -> tuple[dlib.rectangle, float] | None:
    if len(rects) == 0:
        return None
    best = max(range(len(rects)), key=lambda i: rects[i].width() * rects[i].height())
    return rects[best], float(scores[best])


@dataclass
class _Track:
    """State carried between frames: last landmarks and where the detector box sits relative to
    them (so a tracking box can be built in the detector's own framing)."""

    pts: np.ndarray  # (68, 2) in detection-image pixels
    box_offsets: np.ndarray  # (4,) left, top, right, bottom relative to centre, in IOD units
    score: float  # score of the detection that started (or last confirmed) the track
    template: np.ndarray  # (P*P,) zero-mean unit-norm face patch at that detection


def face_patch(gray: np.ndarray, pts: np.ndarray, size: int) -> np.ndarray | None:
    """The landmarks' bounding box as a size x size patch, flattened, zero-mean and unit-norm
    (so a dot product is the normalised cross-correlation); None if empty or flat."""
    import cv2

    h, w = gray.shape
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int), [w, h])
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    patch = cv2.resize(gray[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
    vec = patch.astype(np.float32).ravel()  # (size*size,)
    vec -= vec.mean()
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 1e-3 else None


class LandmarkFaceFeaturizer:
    """dlib HOG detector + 68-point landmarks, with detect-every-N tracking.

    Frames are downscaled so the longer side is at most ``cfg.max_side`` before anything runs.
    Feature layout: :data:`LANDMARKS_FEATURE_NAMES` (face flag, box, score, pose in radians,
    expression measures, normalised landmarks). On frames reached by tracking, ``det_score`` is
    the score of the detection that started the track.
    """

    backend = "landmarks"
    # Tracking is accepted when the re-fitted face keeps its size within this ratio of the last
    # frame's, stays mostly inside the frame and still looks like the detected face (normalised
    # cross-correlation of small patches; measured: same face >= 0.47, background <= 0.37);
    # otherwise the detector runs again.
    max_scale_change = 1.35
    min_inside_fraction = 0.8
    patch_size = 24
    min_similarity = 0.5
    upsample = 0  # dlib detector upsampling (0: faces above ~80 px at max_side)
    refine_steps = 0  # extra landmark fits per tracked frame (each ~2.5 ms)

    def __init__(self, cfg: VisualConfig) -> None:
        if cfg.detect_every < 1:
            raise ConfigError(f"visual.detect_every must be >= 1, got {cfg.detect_every}")
        if cfg.max_side < 32:
            raise ConfigError(f"visual.max_side must be >= 32, got {cfg.max_side}")
        try:
            import dlib
        except ImportError as e:
            raise DependencyError(
                "dlib is not installed: pip install dlib-bin (or use --visual-backend pyfeat)"
            ) from e
        path = shape_predictor_path()
        try:
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as e:
            raise DependencyError(f"{path}: cannot load dlib's landmark model ({one_line(e)})") from e
        self._detector = dlib.get_frontal_face_detector()
        self._rect = dlib.rectangle
        self.cfg = cfg
        self.fps = float(cfg.fps)
        self.max_side = int(cfg.max_side)
        self.detect_every = int(cfg.detect_every)
        self.feature_names = list(LANDMARKS_FEATURE_NAMES)
        self.dim = len(self.feature_names)
        self.last_stats: dict[str, int] = {}

    # -- per-frame steps ---------------------------------------------------------------------

    def _gray(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        if frame.ndim == 3 and frame.shape[2] == 3:
            gray = cv2.cvtColor(np.ascontiguousarray(frame, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
        elif frame.ndim == 2:
            gray = np.ascontiguousarray(frame, dtype=np.uint8)
        else:
            raise ExtractionError(f"expected an HxWx3 RGB frame, got an array of shape {frame.shape}")
        h, w = gray.shape
        scale = self.max_side / max(h, w)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        return gray

    def _fit(self, gray: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        rect = self._rect(*(int(round(v)) for v in box))
        shape = self._predictor(gray, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)  # (68, 2)

    def _detect(self, gray: np.ndarray) -> _Track | None:
        rects, scores, _ = self._detector.run(gray, self.upsample, 0.0)
        found = _largest(rects, scores)
        if found is None:
            return None
        rect, score = found
        box = (rect.left(), rect.top(), rect.right(), rect.bottom())
        pts = self._fit(gray, box)
        centre, iod = pts.mean(axis=0), max(interocular(pts), 1e-6)
        offsets = (np.array(box, dtype=np.float64) - np.tile(centre, 2)) / iod
        template = face_patch(gray, pts, self.patch_size)
        if template is None:
            return None
        return _Track(pts=pts, box_offsets=offsets, score=score, template=template)

    def _follow(self, gray: np.ndarray, track: _Track) -> _Track | None:
        """Fit landmarks in the box implied by the previous landmarks; None if tracking failed."""
        prev = track.pts
        prev_iod = max(interocular(prev), 1e-6)
        box = np.tile(prev.mean(axis=0), 2) + track.box_offsets * prev_iod
        pts = self._fit(gray, tuple(box))
        for _ in range(self.refine_steps):  # re-centre the box on the new fit, fit again
            box = np.tile(pts.mean(axis=0), 2) + track.box_offsets * max(interocular(pts), 1e-6)
            pts = self._fit(gray, tuple(box))
        ratio = interocular(pts) / prev_iod
        h, w = gray.shape
        inside = np.mean((pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h))
        scale_ok = 1 / self.max_scale_change <= ratio <= self.max_scale_change
        if not scale_ok or inside < self.min_inside_fraction:
            return None
        patch = face_patch(gray, pts, self.patch_size)
        if patch is None or float(patch @ track.template) < self.min_similarity:
            return None
        return _Track(pts=pts, box_offsets=track.box_offsets, score=track.score, template=track.template)

    def _row(self, track: _Track, width: int, height: int) -> np.ndarray:
        pts = track.pts
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        box = [(lo[0] + hi[0]) / 2 / width, (lo[1] + hi[1]) / 2 / height,
               (hi[0] - lo[0]) / width, (hi[1] - lo[1]) / height, track.score]
        pose = head_pose(pts, width, height) or (0.0, 0.0, 0.0)
        row = np.concatenate([[1.0], box, pose, expression_measures(pts), normalise_landmarks(pts)])
        return np.nan_to_num(row, nan=0.0, posinf=0.0, neginf=0.0)

    def _backfill(self, track: _Track, pending: list[tuple[int, np.ndarray]],
                  rows: list[np.ndarray | None]) -> int:
        """Follow a newly detected face back through the ``pending`` (index, gray) frames that
        were skipped while no face was known, filling ``rows``; returns how many were filled."""
        filled = 0
        for j, g in reversed(pending):
            followed = self._follow(g, track)
            if followed is None:
                break
            track = followed
            rows[j] = self._row(track, g.shape[1], g.shape[0])
            filled += 1
        return filled

    # -- clip --------------------------------------------------------------------------------

    def __call__(self, frames: Iterable[tuple[float, np.ndarray]]) -> VisualFeatures:
        """Features for a stream of (t_seconds, RGB frame) pairs -> :class:`VisualFeatures`."""
        rows: list[np.ndarray | None] = []  # None = no face
        times: list[float] = []
        pending: list[tuple[int, np.ndarray]] = []  # frames waiting for a detection, no track
        track: _Track | None = None
        since_detect = self.detect_every  # detect on the first frame
        stats = {"frames": 0, "detections": 0, "tracked": 0, "redetections": 0, "backfilled": 0}
        for t, frame in frames:
            index = len(rows)
            times.append(float(t))
            rows.append(None)
            stats["frames"] += 1
            gray = self._gray(np.asarray(frame))
            height, width = gray.shape
            if track is not None and since_detect < self.detect_every:
                followed = self._follow(gray, track)
                since_detect += 1
                if followed is not None:
                    track = followed
                    stats["tracked"] += 1
                    rows[index] = self._row(track, width, height)
                    continue
                stats["redetections"] += 1  # lost: re-detect on this frame right away
            elif track is None and since_detect < self.detect_every:
                pending.append((index, gray))  # resolved by the next detection
                since_detect += 1
                continue
            track = self._detect(gray)
            stats["detections"] += 1
            since_detect = 1
            if track is None:
                pending.clear()
                continue
            rows[index] = self._row(track, width, height)
            stats["backfilled"] += self._backfill(track, pending, rows)
            pending.clear()

        features = np.zeros((len(rows), self.dim), dtype=np.float32)  # (T, d)
        found = np.zeros(len(rows), dtype=bool)  # (T,)
        for i, row in enumerate(rows):
            if row is not None:
                features[i] = row
                found[i] = True
        self.last_stats = stats
        logger.debug("landmarks backend: %s, face in %d/%d frames", stats, found.sum(), len(rows))
        return VisualFeatures(features=features, face_found=found, times=np.asarray(times, np.float32))
