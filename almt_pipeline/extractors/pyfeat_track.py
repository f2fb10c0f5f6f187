"""Batches of video frames through py-feat, with the face detector run every k frames.

py-feat's ``Detectorv1.detect()`` runs its face detector (RetinaFace, the costliest model on a
whole frame) on every image, and cannot take boxes. :class:`FaceTracker` calls the two steps under
it instead: ``detect_faces(images, ...)`` (face detector, then crops for the landmark and emotion
models) and ``forward(faces_data, batch_data)`` (landmarks, AUs, emotions, pose -> one table row
per face, py-feat's columns). The face detector runs on every ``detect_every``-th frame; in between,
the largest face's box from the last detection is carried and handed to ``detect_faces`` in
place of a detection, for as long as that is safe:

- a carried frame is accepted when its landmark fit has about the detection's size and position
  (:attr:`FaceTracker.max_scale_change`, :attr:`FaceTracker.max_shift`), stays inside the crop,
  and the face crop still looks like the detection's (correlation of small grey patches);
  otherwise the detector runs on that frame after all (a re-detection);
- after a detection that found no face, every frame is detected until a face is found.

Every step runs on a whole batch at once: one detector call for the scheduled frames, one for the
frames left without a box, one for the re-detections; one ``detect_faces`` + ``forward`` for all
frames with a box (and one more for the re-detected ones). Frames without a face never reach the
landmark, AU and emotion models.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# py-feat's output columns (feat.utils / feat.pretrained.AU_LANDMARK_MAP["Feat"]).
AU_COLUMNS = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU11", "AU12",
              "AU14", "AU15", "AU17", "AU20", "AU23", "AU24", "AU25", "AU26", "AU28", "AU43"]
EMOTION_COLUMNS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
FACEBOX_COLUMNS = ["FaceRectX", "FaceRectY", "FaceRectWidth", "FaceRectHeight", "FaceScore"]
POSE_COLUMNS = ["Pitch", "Yaw", "Roll"]  # degrees; output as head_pitch/yaw/roll in radians
N_POINTS = 68
LANDMARK_COLUMNS = [f"x_{i}" for i in range(N_POINTS)] + [f"y_{i}" for i in range(N_POINTS)]
FRAME_COLUMN = "frame"

STATS = ("frames", "detected", "scheduled", "searching", "redetected", "tracked", "detector_calls")

# A table: py-feat returns pandas DataFrames (pandas has no type stubs here).
Table = Any


class DetectorSteps(Protocol):
    """The parts of py-feat 2.1.5's ``Detectorv1`` used here."""

    face_size: int  # side of the landmark model's square crop
    # RetinaFace: (B, 3, H, W) pixels in [0, 255] -> per image a list of [x1, y1, x2, y2, score]
    facepose_detector: Any

    def detect_faces(self, images: Any, face_size: int = ..., face_detection_threshold: float = ...) -> list[dict]: ...

    def forward(self, faces_data: list[dict], batch_data: dict) -> Table: ...


@dataclass
class Reference:
    """A detected face: the box carried to the next frames and what their fits are checked against."""

    box: np.ndarray  # (5,) x1, y1, x2, y2, score in frame pixels
    centre: np.ndarray  # (2,) landmark centre, pixels
    size: float  # sqrt of the landmarks' bounding-box area, pixels
    patch: np.ndarray | None  # (P*P,) zero-mean, unit-norm grey patch of the face crop


def largest_face(detections: Sequence[Sequence[float]], threshold: float) -> np.ndarray | None:
    """The (5,) [x1, y1, x2, y2, score] of the largest box scoring at least ``threshold``."""
    boxes = np.asarray([d for d in detections if d[4] >= threshold], dtype=np.float64).reshape(-1, 5)
    if len(boxes) == 0:
        return None
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[int(np.argmax(area))]


def table_landmarks(table: Table) -> np.ndarray:
    """(n, 68, 2) landmarks of a py-feat table, pixels."""
    xy = table[LANDMARK_COLUMNS].to_numpy(dtype=np.float64)  # (n, 136): x_0..x_67, y_0..y_67
    return np.stack([xy[:, :N_POINTS], xy[:, N_POINTS:]], axis=2)


class FaceTracker:
    """Runs py-feat on batches of frames of one clip, keeping one face (the largest) per frame.

    Call :meth:`reset` at the start of a clip, then :meth:`run` on consecutive batches. Counts
    are in :attr:`stats`: ``frames``; ``detected`` (frames the face detector ran on) =
    ``scheduled`` (every ``detect_every``-th) + ``searching`` (no face known) + ``redetected``
    (a carried box failed the checks); ``tracked`` (carried boxes accepted); ``detector_calls``.
    Per frame of the clip, :attr:`boxes` holds the box used (None: no face) and :attr:`kinds` the
    step that settled it: ``scheduled``, ``searching`` or ``redetected`` (the face detector ran on
    the frame) or ``tracked`` (a carried box was accepted).
    """

    max_shift = 0.25  # landmark centre may move this fraction of the face size from the detection's
    max_scale_change = 1.3  # landmark size ratio to the detection's, either way
    min_inside = 0.8  # fraction of landmarks inside the crop
    patch_size = 16  # side of the grey patches compared
    min_similarity = 0.5  # their normalised cross-correlation

    def __init__(self, steps: DetectorSteps, detect_every: int, face_threshold: float) -> None:
        self.steps = steps
        self.detect_every = int(detect_every)
        self.face_threshold = float(face_threshold)
        self.stats: Counter[str] = Counter()
        self.boxes: list[np.ndarray | None] = []  # per frame of the clip: the box used, or None
        self.kinds: list[str] = []  # per frame of the clip: the step that settled it
        self.reset()

    def reset(self) -> None:
        self.ref: Reference | None = None  # the face carried into the next batch
        # frames from the last scheduled detection to the next batch's first frame (the first
        # frame of a clip is scheduled); batch boundaries do not move the schedule
        self.since_detect = self.detect_every
        self.stats = Counter(dict.fromkeys(STATS, 0))
        self.boxes = []
        self.kinds = []

    # -- steps --------------------------------------------------------------------------------

    def _detect(self, images: Any, frames: list[int], boxes: list[np.ndarray | None],
                detected: list[str], kind: str) -> None:
        """Run the face detector on ``frames`` (one batched call); the largest face of each."""
        if not frames:
            return
        found = self.steps.facepose_detector(images[frames].float())  # per frame: [[x1, y1, x2, y2, s], ...]
        for j, detections in zip(frames, found):
            boxes[j] = largest_face(detections, self.face_threshold)
            detected[j] = kind
        self.stats["detected"] += len(frames)
        self.stats[kind] += len(frames)
        self.stats["detector_calls"] += 1

    @contextlib.contextmanager
    def _boxes_as_detections(self, boxes: list[list[list[float]]]) -> Iterator[None]:
        """Make ``detect_faces`` take ``boxes`` (per image, a list of [x1, y1, x2, y2, score]) as
        its face detector's output: py-feat then crops exactly as after its own detection."""
        detector = self.steps.facepose_detector
        self.steps.facepose_detector = lambda images: boxes
        try:
            yield
        finally:
            self.steps.facepose_detector = detector

    def _analyse(self, images: Any, chosen: dict[int, np.ndarray]) -> tuple[Table | None, dict[int, np.ndarray | None]]:
        """py-feat's table (one row per frame, with a ``frame`` column) and the crops' grey
        patches for the frames of ``chosen`` (frame -> box), each analysed in its box."""
        if not chosen:
            return None, {}
        import torch

        frames = list(chosen)
        with self._boxes_as_detections([[chosen[j][:5].tolist()] for j in frames]):
            faces = self.steps.detect_faces(images[frames], face_size=self.steps.face_size,
                                            face_detection_threshold=self.face_threshold)
        n = len(frames)
        zeros = torch.zeros(n)  # the frames are neither padded nor scaled: py-feat's output is in their pixels
        batch_data = {"Image": images[frames], "Scale": torch.ones(n),
                      "Padding": {"Left": zeros, "Top": zeros, "Right": zeros, "Bottom": zeros}}
        table = self.steps.forward(faces, batch_data)
        if len(table) != n:
            raise AssertionError(f"py-feat returned {len(table)} rows for {n} boxes")
        table[FRAME_COLUMN] = frames
        patches = {j: self._patch(face["faces"]) for j, face in zip(frames, faces)}
        return table, patches

    def _patch(self, crop: Any) -> np.ndarray | None:
        """A (1, 3, S, S) face crop -> a zero-mean, unit-norm (P*P,) grey patch, or None if flat."""
        import torch.nn.functional as F

        grey = crop.float().mean(dim=1, keepdim=True)  # (1, 1, S, S)
        vec = F.adaptive_avg_pool2d(grey, self.patch_size).flatten().cpu().numpy().astype(np.float64)
        vec -= vec.mean()
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 1e-6 else None

    def _reference(self, box: np.ndarray, points: np.ndarray, patch: np.ndarray | None) -> Reference:
        lo, hi = points.min(axis=0), points.max(axis=0)
        size = float(np.sqrt(max((hi[0] - lo[0]) * (hi[1] - lo[1]), 1e-12)))
        return Reference(box=box, centre=points.mean(axis=0), size=size, patch=patch)

    def consistent(self, ref: Reference, points: np.ndarray, patch: np.ndarray | None) -> bool:
        """Whether a fit in the carried box ``ref.box`` still shows the detected face."""
        if not (np.all(np.isfinite(points)) and math.isfinite(ref.size)):
            return False
        now = self._reference(ref.box, points, patch)
        if abs(math.log(now.size / max(ref.size, 1e-12))) > math.log(self.max_scale_change):
            return False
        if np.linalg.norm(now.centre - ref.centre) > self.max_shift * ref.size:
            return False
        x1, y1, x2, y2 = ref.box[:4]
        cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, 0.6 * (x2 - x1), 0.6 * (y2 - y1)  # the 1.2x crop
        inside = (np.abs(points[:, 0] - cx) <= half_w) & (np.abs(points[:, 1] - cy) <= half_h)
        if inside.mean() < self.min_inside:
            return False
        # a flat crop (no patch) is no face, and a detection with one cannot vouch for the box
        return ref.patch is not None and patch is not None and float(ref.patch @ patch) >= self.min_similarity

    # -- a batch --------------------------------------------------------------------------------

    def run(self, images: Any) -> list[Table]:
        """(B, 3, H, W) uint8 RGB frames -> py-feat's tables (none, one, or two after
        re-detections), together one row per frame that has a face, with a ``frame`` column
        (0..B-1)."""
        n = int(images.shape[0])
        boxes: list[np.ndarray | None] = [None] * n
        detected = [""] * n  # per frame: the detection step that ran on it ("": none)
        self.stats["frames"] += n

        # 1. the scheduled detections, every detect_every frames (2. covers those that find no face)
        scheduled, since = [], self.since_detect
        for j in range(n):
            if since >= self.detect_every:
                scheduled.append(j)
                since = 0
            since += 1
        self._detect(images, scheduled, boxes, detected, "scheduled")

        # 2. carry each detection's box forward; frames with none to carry are detected too
        source = [-2] * n  # per carried frame: the frame it is carried from (-1: an earlier batch)
        current, current_from = (self.ref.box, -1) if self.ref is not None else (None, -1)
        searching = []
        for j in range(n):
            if detected[j]:
                current, current_from = boxes[j], j
            elif current is not None:
                boxes[j], source[j] = current, current_from
            else:
                searching.append(j)
        self._detect(images, searching, boxes, detected, "searching")

        # 3. landmarks, AUs, emotions, pose for every frame with a box
        chosen = {j: box for j, box in enumerate(boxes) if box is not None}
        table, patches = self._analyse(images, chosen)
        points = dict(zip(chosen, table_landmarks(table))) if table is not None else {}
        refs = {j: self._reference(box, points[j], patches[j]) for j, box in chosen.items() if detected[j]}
        if self.ref is not None:
            refs[-1] = self.ref

        # 4. check the carried frames; detect again where the carried box no longer fits
        carried = [j for j in chosen if not detected[j]]
        failed = [j for j in carried if not self.consistent(refs[source[j]], points[j], patches[j])]
        self.stats["tracked"] += len(carried) - len(failed)
        tables: list[Table] = []
        if failed:
            for j in failed:
                boxes[j] = None
            self._detect(images, failed, boxes, detected, "redetected")
            again = {j: box for j in failed if (box := boxes[j]) is not None}
            redo, redo_patches = self._analyse(images, again)
            if table is not None:
                table = table[~table[FRAME_COLUMN].isin(failed)]
            if redo is not None:
                tables.append(redo)
                for (j, box), pts in zip(again.items(), table_landmarks(redo)):
                    refs[j] = self._reference(box, pts, redo_patches[j])
        if table is not None:
            tables.insert(0, table)

        # 5. what the next batch carries: what step 2 would carry past this batch's last frame,
        # the last scheduled or searching detection (a re-detection settles its own frame only)
        self.since_detect = since
        last = max((j for j in range(n) if detected[j] in ("scheduled", "searching")), default=None)
        if last is not None:
            self.ref = refs.get(last)  # None when that detection found no face
        self.boxes.extend(boxes)
        self.kinds.extend(kind or "tracked" for kind in detected)
        return tables


__all__ = ["AU_COLUMNS", "DetectorSteps", "EMOTION_COLUMNS", "FACEBOX_COLUMNS", "FRAME_COLUMN", "FaceTracker",
           "LANDMARK_COLUMNS", "POSE_COLUMNS", "Reference", "largest_face", "table_landmarks"]
