"""Face featurizers: the dlib landmarks backend on real frames and the py-feat adapter."""

from __future__ import annotations

import builtins
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from almt_pipeline.config import VisualConfig
from almt_pipeline.errors import ConfigError, DependencyError
from almt_pipeline.extractors import faces as F
from almt_pipeline.extractors import visual as V
from almt_pipeline.extractors.pyfeat_backend import (
    AU_COLUMNS,
    EMOTION_COLUMNS,
    FACEBOX_COLUMNS,
    LANDMARK_COLUMNS,
    PyFeatFaceFeaturizer,
    pyfeat_feature_names,
)
from almt_pipeline.media import iter_frames

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
SHARED_MEDIA = REPO.parent / "shared" / "media"  # present in the development checkout only


def _find(name: str) -> Path:
    for folder in (DATA, SHARED_MEDIA):
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} is not available")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """A frontal, smiling face (NASA photo, public domain), RGB uint8."""
    import cv2

    path = DATA / "astronaut.jpg" if (DATA / "astronaut.jpg").is_file() else _find("astronaut.png")
    img = cv2.imread(str(path))
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def landmarks_fz() -> V.LandmarkFaceFeaturizer:
    return F.make_face_featurizer(VisualConfig())


def _col(fz, vf: F.VisualFeatures, name: str) -> np.ndarray:
    return vf.features[:, fz.feature_names.index(name)]


# ------------------------------------------------------------------------------- interface


def test_feature_names_fixed(landmarks_fz):
    names = landmarks_fz.feature_names
    assert names == V.LANDMARKS_FEATURE_NAMES and len(set(names)) == len(names)
    assert landmarks_fz.dim == len(names) == 1 + 5 + 3 + len(V.EXPRESSION_NAMES) + 136
    assert names[0] == "face_found" and landmarks_fz.backend == "landmarks"
    assert landmarks_fz.fps == VisualConfig().fps
    with pytest.raises(ConfigError, match="unknown visual backend"):
        F.make_face_featurizer(VisualConfig(backend="openface"))
    with pytest.raises(ConfigError, match="detect_every"):
        F.make_face_featurizer(VisualConfig(detect_every=0))


def test_backends_depend_on_faces_only():
    # Each backend imports the shared module and never the other backend; the shared module
    # imports no backend, it finds them by name when a featurizer is built.
    code = (
        "import sys\n"
        "import almt_pipeline.extractors.faces\n"
        "assert 'almt_pipeline.extractors.visual' not in sys.modules\n"
        "assert 'almt_pipeline.extractors.pyfeat_backend' not in sys.modules\n"
        "import almt_pipeline.extractors.pyfeat_backend\n"
        "assert 'almt_pipeline.extractors.visual' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(F.BACKENDS) == {"landmarks", "pyfeat"}
    assert V.LANDMARKS_FEATURE_NAMES[:1] == F.FACE_FLAG and V.LANDMARKS_FEATURE_NAMES[-136:] == F.LANDMARK_NAMES
    assert pyfeat_feature_names(True)[-136:] == F.LANDMARK_NAMES
    assert type(F.make_face_featurizer(VisualConfig())) is V.LandmarkFaceFeaturizer


def test_shape_predictor_found_without_importing_package():
    path = V.shape_predictor_path()
    assert path.name == V.SHAPE_PREDICTOR_FILE and path.is_file()
    assert "face_recognition_models" not in sys.modules


def test_empty_stream(landmarks_fz):
    vf = landmarks_fz([])
    assert vf.features.shape == (0, landmarks_fz.dim) and vf.face_found.shape == (0,)


# ------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("pose", [(0.0, 0.0, 0.0), (0.3, 0.0, 0.0), (0.0, -0.4, 0.0), (0.0, 0.0, 0.3),
                                  (-0.2, 0.3, -0.1)])
def test_head_pose_recovers_projected_model(pose):
    import cv2

    rot = V.pose_to_rotation(*pose)
    assert np.allclose(V.rotation_to_pose(rot), pose, atol=1e-9)
    rvec, _ = cv2.Rodrigues(rot)
    cam = V.camera_matrix(320, 180, np.array([160.0, 90.0]))
    proj, _ = cv2.projectPoints(V.POSE_MODEL, rvec, np.array([0.0, 0.0, 600.0]), cam, None)
    pts = np.repeat(proj.reshape(-1, 2).mean(axis=0, keepdims=True), F.N_LANDMARKS, axis=0)  # (68, 2)
    pts[V.POSE_POINTS] = proj.reshape(-1, 2)
    est = V.head_pose(pts, 320, 180)
    assert est is not None and np.allclose(est, pose, atol=0.03)
    # Sign conventions (py-feat's): +yaw turns the nose to the image left, +pitch lifts it,
    # +roll lowers the subject's right eye (image left).
    nose, eye_r, eye_l = pts[V.NOSE_TIP], pts[V.EYE_R_OUTER], pts[V.EYE_L_OUTER]
    if pose[1]:
        assert np.sign(nose[0] - (eye_r[0] + eye_l[0]) / 2) == -np.sign(pose[1])
    if pose[2]:
        assert np.sign(eye_r[1] - eye_l[1]) == np.sign(pose[2])


def test_expression_measures_respond_to_mouth():
    pts = np.zeros((F.N_LANDMARKS, 2))
    pts[F.EYE_R] = [100, 100]
    pts[F.EYE_L] = [160, 100]  # IOD = 60 px
    pts[[V.MOUTH_R, V.MOUTH_L]] = [[110, 180], [150, 180]]
    pts[[V.INNER_UPPER_LIP, V.INNER_LOWER_LIP]] = [[130, 178], [130, 190]]
    m = dict(zip(V.EXPRESSION_NAMES, V.expression_measures(pts), strict=True))
    assert m["mouth_open"] == pytest.approx(12 / 60)
    assert m["mouth_width"] == pytest.approx(40 / 60)
    assert m["lip_corner_raise"] == pytest.approx((184 - 180) / 60)  # corners above the centre
    # Same face twice as large, shifted and rotated: same measures.
    ang = 0.3
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    moved = (pts * 2) @ rot.T + [40, -25]
    assert np.allclose(V.expression_measures(moved), V.expression_measures(pts), atol=1e-9)


# ------------------------------------------------------------------------------- real frames


def test_frontal_face(astronaut):
    # Detection at full size: at 320 px this face is near the HOG detector's ~80 px minimum.
    landmarks_fz = F.make_face_featurizer(VisualConfig(max_side=max(astronaut.shape[:2])))
    vf = landmarks_fz([(0.0, astronaut), (0.1, astronaut)])
    assert vf.features.dtype == np.float32 and vf.features.shape == (2, landmarks_fz.dim)
    assert vf.face_found.all() and np.isfinite(vf.features).all()
    assert np.allclose(vf.features[0], vf.features[1], atol=1e-3)  # tracked frame == detected frame
    for name in ("head_pitch", "head_yaw", "head_roll"):
        assert abs(_col(landmarks_fz, vf, name)[0]) < math.radians(20), name
    assert _col(landmarks_fz, vf, "lip_corner_raise")[0] > 0.02  # she smiles
    assert 0.1 < _col(landmarks_fz, vf, "eye_open_left")[0] < 0.5
    assert 0 < _col(landmarks_fz, vf, "face_x")[0] < 1 and _col(landmarks_fz, vf, "det_score")[0] > 0


def test_position_and_zoom_do_not_matter(astronaut):
    import cv2

    h, w = astronaut.shape[:2]
    fz = F.make_face_featurizer(VisualConfig(max_side=max(h, w), detect_every=1))
    x0 = w // 10  # zoom in 1.5x and shift: the face lands elsewhere, larger
    zoomed = cv2.resize(astronaut, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR)[:h, x0:x0 + w]
    vf = fz([(0.0, astronaut), (0.1, zoomed), (0.2, np.ascontiguousarray(astronaut[:, ::-1]))])
    assert vf.face_found.all()
    assert _col(fz, vf, "face_w")[1] > 1.3 * _col(fz, vf, "face_w")[0]
    lm = slice(fz.feature_names.index("lm_x_0"), None)
    expr = slice(fz.feature_names.index(V.EXPRESSION_NAMES[0]), lm.start)
    assert np.abs(vf.features[0, lm] - vf.features[1, lm]).mean() < 0.03
    assert np.abs(vf.features[0, expr] - vf.features[1, expr]).max() < 0.1
    # The mirrored face turns and tilts the other way.
    yaw, roll = _col(fz, vf, "head_yaw"), _col(fz, vf, "head_roll")
    assert abs(yaw[0] + yaw[2]) < 0.05 and abs(roll[0] + roll[2]) < 0.05


def test_no_face_clip_gives_zeros(landmarks_fz):
    path = _find("no_face.mp4")
    vf = landmarks_fz(iter_frames(path, 10, 320))
    assert len(vf.face_found) >= 10 and not vf.face_found.any()
    assert not vf.features.any()
    stats = landmarks_fz.last_stats
    assert stats["detections"] == math.ceil(stats["frames"] / VisualConfig().detect_every)


@pytest.mark.parametrize("name", ["speech_face.mp4", "WolfgangLanger_Pexels.mp4"])
def test_tracking_between_detections(name):
    path = _find(name)
    frames = []
    for t, frame in iter_frames(path, 10, 320):
        if t >= 4.0:
            break
        frames.append((t, frame.copy()))
    tracked = F.make_face_featurizer(VisualConfig(detect_every=5))
    vf = tracked(frames)
    assert vf.face_fraction >= 0.9
    stats = tracked.last_stats
    assert stats["tracked"] > stats["detections"] and stats["detections"] < len(frames)
    every = F.make_face_featurizer(VisualConfig(detect_every=1))(frames)
    both = vf.face_found & every.face_found
    lm = slice(tracked.feature_names.index("lm_x_0"), None)
    assert np.abs(vf.features[both, lm] - every.features[both, lm]).mean() < 0.05  # IOD units


def test_lost_track_and_backfill():
    _, face = next(iter(iter_frames(_find("speech_face.mp4"), 10, 320)))
    fz = F.make_face_featurizer(VisualConfig(detect_every=4))
    blank = np.full_like(face, 128)
    # A face, then a blank frame (tracking must fail, not follow a ghost), then the face again:
    # the frames before the next scheduled detection are filled in by tracking backwards.
    seq = [face, face, blank, face, face, face, face]
    vf = fz([(i / 10, f) for i, f in enumerate(seq)])
    assert vf.face_found.tolist() == [True, True, False, True, True, True, True]
    assert fz.last_stats["redetections"] == 1 and fz.last_stats["backfilled"] == 3
    assert not vf.features[2].any()
    assert np.allclose(vf.features[3], vf.features[0], atol=1e-3)


# ------------------------------------------------------------------------------- py-feat adapter


def _frame_index(image) -> int:
    return int(image[0, 0, 0])  # the frame's number, painted into its corner by _numbered()


def _numbered(n: int, shape=(360, 640, 3)) -> list:
    """``n`` black frames, frame i with the value i in its top-left 8x8 pixels (kept by downscaling)."""
    frames = []
    for i in range(n):
        img = np.zeros(shape, np.uint8)
        img[:8, :8] = i
        frames.append((i / 10, img))
    return frames


class StandInDetector:
    """Stands in for the parts of py-feat 2.1.5's ``Detectorv1`` the backend calls
    (:class:`~almt_pipeline.extractors.pyfeat_track.DetectorSteps`); the real one runs in
    tests/test_pyfeat_real.py. ``facepose_detector(images)`` answers like RetinaFace: per image a
    list of ``[x1, y1, x2, y2, score]``; ``detect_faces`` asks ``facepose_detector`` and crops;
    ``forward`` returns one row per face with py-feat's columns, computed from the scripted face
    found at that box in that frame (the frame is known from its painted number). A box where the
    frame has no such face gets a degenerate landmark fit, as a real landmark model would on
    background."""

    face_size = 112

    def __init__(self, faces_per_frame):
        self.faces_per_frame = list(faces_per_frame)  # per frame: list of (x, y, w, h, value)
        self.detect_calls = []  # (B, 3, H, W) of each face-detector call
        self.facepose_detector = self._retinaface

    def _retinaface(self, images):
        self.detect_calls.append(tuple(images.shape))
        return [[[x, y, x + w, y + h, 0.99] for x, y, w, h, _ in self.faces_per_frame[_frame_index(image)]]
                for image in images]

    def detect_faces(self, images, face_size=112, face_detection_threshold=0.5):
        import torch

        crop = torch.linspace(0, 1, 3 * face_size * face_size).reshape(1, 3, face_size, face_size)
        out = []
        for image, found in zip(images, self.facepose_detector(images.float())):
            boxes = [b for b in found if b[4] >= face_detection_threshold]
            out.append({"frame": _frame_index(image), "boxes": boxes, "faces": crop.repeat(len(boxes), 1, 1, 1)})
        return out

    def forward(self, faces_data, batch_data):
        rows = []
        for face in faces_data:
            scripted = {(x, y): (w, h, v) for x, y, w, h, v in self.faces_per_frame[face["frame"]]}
            for x1, y1, x2, y2, score in face["boxes"]:
                w, h = x2 - x1, y2 - y1
                value = scripted.get((x1, y1), (w, h, 0.0))[2]
                spread = 1.0 if (x1, y1) in scripted else 0.01  # background: a collapsed fit
                lm = np.arange(len(LANDMARK_COLUMNS), dtype=float)
                xs = x1 + w * (0.5 + spread * (-0.3 + 0.6 * (lm[:68] % 17) / 16))
                ys = y1 + h * (0.5 + spread * (-0.3 + 0.6 * (lm[68:] - 68) / 67))
                row = dict(zip(FACEBOX_COLUMNS, [x1, y1, w, h, score], strict=True))
                row.update(zip(LANDMARK_COLUMNS, np.concatenate([xs, ys]), strict=True))
                row.update({"Pitch": value, "Roll": -value, "Yaw": 2 * value, "X": 0, "Y": 0, "Z": 0})
                row.update({au: value / 10 for au in AU_COLUMNS})
                row.update({emo: value / 100 for emo in EMOTION_COLUMNS})
                rows.append(row)
        return pd.DataFrame(rows)


def test_pyfeat_adapter_with_stand_in():
    faces = [
        [(10, 10, 50, 60, 5.0)],                          # one face
        [(0, 0, 20, 20, 1.0), (100, 50, 80, 90, 7.0)],    # two faces: the larger one wins
        [],                                               # no face
        [(30, 20, 40, 40, 3.0)],
        [(30, 20, 40, 40, 4.0)],
    ]
    cfg = VisualConfig(backend="pyfeat", pyfeat_landmarks=True, max_side=320, detect_every=1)
    det = StandInDetector(faces)
    fz = PyFeatFaceFeaturizer(cfg, detector=det, batch_size=2)
    assert fz.feature_names == pyfeat_feature_names(True) and fz.dim == 1 + 20 + 7 + 3 + 136
    vf = fz(_numbered(len(faces)))
    assert det.detect_calls == [(2, 3, 180, 320), (2, 3, 180, 320), (1, 3, 180, 320)]  # batched, downscaled
    assert vf.features.shape == (5, fz.dim) and vf.features.dtype == np.float32
    assert vf.face_found.tolist() == [True, True, False, True, True]
    assert not vf.features[2].any() and np.isfinite(vf.features).all()
    au01 = fz.feature_names.index("AU01")
    assert vf.features[:, au01].tolist() == pytest.approx([0.5, 0.7, 0.0, 0.3, 0.4])
    pose = [fz.feature_names.index(n) for n in ("head_pitch", "head_yaw", "head_roll")]
    assert vf.features[1, pose] == pytest.approx(np.radians([7.0, 14.0, -7.0]))
    assert vf.features[1, fz.feature_names.index("happiness")] == pytest.approx(0.07)
    lm = slice(fz.feature_names.index("lm_x_0"), None)
    assert abs(vf.features[0, lm].mean()) < 1e-5 and vf.features[0, lm].std() > 0.1  # normalised
    assert fz.last_kinds == ["scheduled"] * 5  # detect_every 1: the detector runs on every frame

    short = PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat"), detector=StandInDetector(faces[:2]))
    assert short.dim == 31 and short(_numbered(2)).features.shape == (2, 31)
    assert short.batch_size == VisualConfig().pyfeat_batch_size


def test_pyfeat_tracks_between_detections_with_stand_in():
    # frames 0-3: the face at (10, 10); from frame 4 it is at (150, 90); frame 9 has none
    faces = [[(10, 10, 50, 60, float(i))] if i < 4 else [(150, 90, 50, 60, float(i))] for i in range(9)] + [[]]
    det = StandInDetector(faces)
    fz = PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat", detect_every=3), detector=det, batch_size=4)
    vf = fz(_numbered(len(faces)))
    assert fz.last_kinds == ["scheduled", "tracked", "tracked", "scheduled",
                             "redetected", "redetected",  # the carried box (10, 10) is empty now
                             "scheduled", "tracked", "tracked",  # the batch of frames 8-9 carries on
                             "scheduled"]  # due again; finds nothing
    assert sum(shape[0] for shape in det.detect_calls) == fz.last_stats["detected"] == 6
    assert fz.last_stats == {"frames": 10, "detected": 6, "scheduled": 4, "searching": 0, "redetected": 2,
                             "tracked": 4, "detector_calls": 4}
    assert [None if b is None else tuple(b[:2]) for b in fz.last_boxes] == (
        [(10, 10)] * 4 + [(150, 90)] * 5 + [None])
    au01 = vf.features[:, fz.feature_names.index("AU01")]
    assert au01.tolist() == pytest.approx([i / 10 for i in range(9)] + [0.0])  # analysed in every frame
    assert vf.face_found.tolist() == [True] * 9 + [False]


def test_pyfeat_missing_gives_dependency_error(monkeypatch):
    real_import = builtins.__import__

    def no_feat(name, *args, **kwargs):
        if name == "feat" or name.startswith("feat."):
            raise ModuleNotFoundError("No module named 'feat'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_feat)
    fz = F.make_face_featurizer(VisualConfig(backend="pyfeat", pyfeat_device="cpu"))  # lazy: no error yet
    with pytest.raises(DependencyError, match="py-feat is not installed.*landmarks"):
        fz([(0.0, np.zeros((32, 32, 3), np.uint8))])


def _stub_pyfeat(monkeypatch, detector_class) -> None:
    """A stand-in ``feat`` package whose ``Detectorv1`` is ``detector_class``."""
    import types

    modules = {name: types.ModuleType(name) for name in
               ("feat", "feat.detector", "feat.utils", "feat.utils.io", "feat.utils.face_pose_mlp")}
    modules["feat.detector"].Detectorv1 = detector_class
    modules["feat.detector"].get_resource_path = modules["feat.utils.io"].get_resource_path = lambda: "/nowhere"
    modules["feat.utils.face_pose_mlp"].pose_from_landmarks_mlp = lambda landmarks: None
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_pyfeat_weights_unavailable_gives_dependency_error(monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    _stub_pyfeat(monkeypatch, offline)
    fz = PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat", pyfeat_device="cpu"))
    with pytest.raises(DependencyError, match="could not load its model weights.*couldn't connect"):
        fz([(0.0, np.zeros((32, 32, 3), np.uint8))])


def test_pyfeat_weights_folder_missing_files_offline(monkeypatch, tmp_path):
    built = []
    _stub_pyfeat(monkeypatch, lambda **kwargs: built.append(kwargs))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "weights"
    fz = PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat", pyfeat_device="cpu", pyfeat_weights=str(folder)))
    with pytest.raises(DependencyError) as info:
        fz([(0.0, np.zeros((32, 32, 3), np.uint8))])
    line = str(info.value)
    assert "\n" not in line and not built  # checked before anything is built
    assert line.startswith(f"py-feat weights missing from {folder}: py-feat/retinaface_r34/model.safetensors, ")
    assert "HF_HUB_OFFLINE" in line
    assert f"hf download py-feat/xgb_au xgb_au_classifier_v2.skops --cache-dir {folder}" in line

    (tmp_path / "file").write_text("")
    cfg = VisualConfig(backend="pyfeat", pyfeat_device="cpu", pyfeat_weights=str(tmp_path / "file"))
    fz = PyFeatFaceFeaturizer(cfg)
    with pytest.raises(DependencyError, match="not a folder"):
        fz([(0.0, np.zeros((32, 32, 3), np.uint8))])


def test_pyfeat_weights_folder_from_the_environment_overrides_the_config(monkeypatch, tmp_path):
    """ALMT_PYFEAT_WEIGHTS is this machine's weights folder, for commands that rebuild extraction
    from a checkpoint (the folder recorded there is another machine's). py-feat itself is the
    boundary stubbed here; the real build runs in tests/test_pyfeat_real.py."""
    import almt_pipeline.extractors.pyfeat_backend as PB

    seen = []
    monkeypatch.setattr(PB, "build_pyfeat_detector", lambda device, weights: seen.append(weights) or object())
    cfg = VisualConfig(backend="pyfeat", pyfeat_weights="/elsewhere/weights", pyfeat_device="cpu")
    assert PB.PyFeatFaceFeaturizer(cfg).detector is not None
    monkeypatch.setenv("ALMT_PYFEAT_WEIGHTS", str(tmp_path))
    assert PB.PyFeatFaceFeaturizer(cfg).detector is not None
    assert seen == ["/elsewhere/weights", str(tmp_path)]
