"""The pyfeat backend on py-feat's real ``Detectorv1``, offline, with random weights.

Runs where py-feat is installed: ``make test-pyfeat`` (the separate ``.venv-pyfeat``, see the
Makefile) builds the random weight cache with ``scripts/make_pyfeat_weights.py`` and runs this
module with ``HF_HUB_OFFLINE=1``; in the main environment it is skipped. Every model is py-feat's
own code; only the weights are random, so AU, emotion and pose values are meaningless and the
"faces" are wherever the random detector fires (never on a frame of RetinaFace's mean colour).
The tests check what does not depend on trained weights: feature names and widths, that the
largest proposal is kept and carried, that the detector runs every k frames, that frames without
a face are zeros, finiteness, and the one-line error for missing weights.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("feat", reason="py-feat is not installed here (make pyfeat-env; make test-pyfeat)")

from feat.face_detectors.Retinaface.Retinaface_test import Retinaface  # noqa: E402
from feat.pretrained import AU_LANDMARK_MAP  # noqa: E402
from feat.utils import FEAT_EMOTION_COLUMNS  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from almt_pipeline.cli import app  # noqa: E402
from almt_pipeline.config import VisualConfig  # noqa: E402
from almt_pipeline.extractors.faces import LANDMARK_NAMES  # noqa: E402
from almt_pipeline.extractors.pyfeat_backend import (  # noqa: E402
    PyFeatFaceFeaturizer,
    build_pyfeat_detector,
    pyfeat_feature_names,
)
from almt_pipeline.extractors.pyfeat_track import largest_face  # noqa: E402
from almt_pipeline.extractors.pyfeat_weights import REQUIRED_FILES, cached_file_path  # noqa: E402
from almt_pipeline.features import load_features  # noqa: E402
from almt_pipeline.media import iter_frames  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
MEAN_COLOUR = (123, 117, 104)  # RetinaFace subtracts it: all-zero features, no face with random weights
runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random weight cache: ``ALMT_PYFEAT_TEST_WEIGHTS`` (``make test-pyfeat``), else built here."""
    given = os.environ.get("ALMT_PYFEAT_TEST_WEIGHTS")
    if given:
        return Path(given)
    folder = tmp_path_factory.mktemp("pyfeat-weights")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_pyfeat_weights.py"), str(folder)], check=True)
    return folder


@pytest.fixture(scope="module")
def detector(weights: Path):
    return build_pyfeat_detector("cpu", weights)


@pytest.fixture
def detector_frames(detector, monkeypatch) -> list[int]:
    """Counts the frames py-feat's RetinaFace runs on (one entry per call)."""
    retina = detector.facepose_detector
    assert isinstance(retina, Retinaface)
    real = retina.forward
    calls: list[int] = []

    def forward(img):
        calls.append(int(img.shape[0]))
        return real(img)

    monkeypatch.setattr(retina, "forward", forward)
    return calls


def featurizer(detector, batch_size: int = 8, **cfg) -> PyFeatFaceFeaturizer:
    return PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat", **cfg), detector=detector, batch_size=batch_size)


def frames_of(name: str, fps: float, max_side: int = 320) -> list[tuple[float, np.ndarray]]:
    return list(iter_frames(DATA / name, fps, max_side))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_feature_names_are_pyfeat_columns():
    names = pyfeat_feature_names(False)
    assert names[1:21] == AU_LANDMARK_MAP["Feat"] and names[21:28] == FEAT_EMOTION_COLUMNS
    assert names == ["face_found", *AU_LANDMARK_MAP["Feat"], *FEAT_EMOTION_COLUMNS,
                     "head_pitch", "head_yaw", "head_roll"]
    assert len(names) == 31 and pyfeat_feature_names(True) == names + LANDMARK_NAMES


def test_extract_cli_runs_the_real_detector(tmp_path, weights, monkeypatch):
    seen: list[int] = []
    real = Retinaface.forward

    def forward(self, img):
        seen.append(int(img.shape[0]))
        return real(self, img)

    monkeypatch.setattr(Retinaface, "forward", forward)
    out = tmp_path / "features.pkl"
    r = invoke("extract", DATA / "mini_dataset", "--config", "pyfeat", "--pyfeat-weights", weights,
               "--fps", "2", "-o", out, "--cache-dir", tmp_path / "cache", "-q")
    assert r.exit_code == 0, r.output
    assert sum(seen) > 0  # py-feat's RetinaFace ran
    ff = load_features(out)
    assert ff.meta["feature_names"]["vision"] == pyfeat_feature_names(False)
    assert ff.meta["extract"]["visual"]["pyfeat_weights"] == str(weights.resolve())
    for split in ff.splits.values():
        vision, lengths = split["vision"], split["vision_lengths"]  # (N, T, 31), (N,)
        assert vision.shape[2] == 31 and np.isfinite(vision).all()
        flag = vision[..., 0]
        assert set(np.unique(flag)) <= {0.0, 1.0}
        assert not vision[flag == 0].any()  # frames without a face (and padding) are all zeros
        assert all(flag[i, :n].sum() > 0 for i, n in enumerate(lengths))  # the random detector fires


def test_extract_cli_with_landmarks(tmp_path, weights):
    cfg = yaml.safe_load((REPO / "configs" / "pyfeat.yaml").read_text())
    cfg["model"]["vision_dim"] = 167
    cfg["extract"]["visual"].update(pyfeat_landmarks=True, pyfeat_weights=str(weights), fps=3.0)
    path = tmp_path / "pyfeat-landmarks.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "features.pkl"
    r = invoke("extract", DATA / "with_sidecar.mp4", "--config", path, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    ff = load_features(out, require_labels=False, splits=None)
    names = ff.meta["feature_names"]["vision"]
    assert names == pyfeat_feature_names(True) and names[-136:] == LANDMARK_NAMES
    vision = ff.splits["test"]["vision"]  # (1, T, 167)
    assert vision.shape[2] == 167 and np.isfinite(vision).all()


def test_detector_runs_every_k_frames(detector, detector_frames):
    frames = frames_of("speech_face.mp4", fps=8)  # 23 frames: three batches of 8
    fz = featurizer(detector, detect_every=5)
    vf = fz(frames)
    n, stats, kinds = len(frames), fz.last_stats, fz.last_kinds
    detected = [i for i, k in enumerate(kinds) if k != "tracked"]
    assert sum(detector_frames) == len(detected) == stats["detected"]
    assert stats["detected"] == stats["scheduled"] + stats["searching"] + stats["redetected"]
    assert stats["tracked"] == n - len(detected) > 0 and stats["frames"] == n
    assert detected[0] == 0 and max(np.diff(detected)) <= 5  # never more than k frames apart
    assert math.ceil(n / 5) <= len(detected) < n
    if stats["redetected"] == stats["searching"] == 0:
        assert detected == list(range(0, n, 5))
    assert vf.features.shape == (n, 31) and np.isfinite(vf.features).all()
    assert vf.face_found.mean() > 0.5

    detector_frames.clear()
    every = featurizer(detector, detect_every=1)
    every(frames[:6])
    assert sum(detector_frames) == 6 and "tracked" not in every.last_kinds


def two_faces() -> list[tuple[float, np.ndarray]]:
    """The woman clip with the astronaut photo pasted small in a corner: two faces per frame."""
    import cv2

    photo = cv2.cvtColor(cv2.imread(str(DATA / "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    small = cv2.resize(photo, (72, 72), interpolation=cv2.INTER_AREA)
    out = []
    for t, frame in frames_of("speech_face.mp4", fps=4):
        frame = frame.copy()
        frame[8:80, 8:80] = small
        out.append((t, frame))
    return out


def test_largest_face_is_kept_and_carried(detector):
    import torch

    frames = two_faces()
    fz = featurizer(detector, detect_every=3, batch_size=4)
    vf = fz(frames)
    assert vf.face_found.all()  # the random detector fires on every textured frame
    last_detection = None
    for i, (kind, box) in enumerate(zip(fz.last_kinds, fz.last_boxes)):
        assert box is not None
        if kind == "tracked":  # carried: the box of the last detection, unchanged
            assert np.array_equal(box, last_detection)
            continue
        image = torch.from_numpy(frames[i][1]).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        proposals = detector.facepose_detector(image)[0]  # every box RetinaFace proposes
        assert len(proposals) >= 1
        assert np.allclose(box, largest_face(proposals, fz.face_threshold), atol=1e-3)
        areas = [(p[2] - p[0]) * (p[3] - p[1]) for p in proposals if p[4] >= fz.face_threshold]
        assert (box[2] - box[0]) * (box[3] - box[1]) == pytest.approx(max(areas), rel=1e-4)
        last_detection = box
    assert "tracked" in fz.last_kinds


def test_frames_without_a_face_are_zeros(detector):
    faces = frames_of("speech_face.mp4", fps=4)[:4]
    h, w = faces[0][1].shape[:2]
    empty = np.empty((h, w, 3), np.uint8)
    empty[:] = MEAN_COLOUR
    frames = faces + [(0.0, empty)] * 6 + faces
    fz = featurizer(detector, detect_every=3, batch_size=16)
    vf = fz(frames)
    gap = slice(4, 10)
    assert not vf.face_found[gap].any() and not vf.features[gap].any()
    assert vf.face_found[:4].all() and vf.face_found[10:].all()  # found again after the gap
    assert "tracked" not in fz.last_kinds[gap]  # a carried box over an empty frame is refused
    assert np.isfinite(vf.features).all() and (vf.features[:, 0] == vf.face_found).all()


def test_missing_weights_is_one_line(tmp_path, weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("extract", DATA / "with_sidecar.mp4", "--config", "pyfeat", "--pyfeat-weights", empty,
               "-o", tmp_path / "a.pkl")
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.output
    line = errors[0]
    for repo, names in REQUIRED_FILES.items():
        assert f"hf download {repo} {' '.join(names)} --cache-dir {empty}" in line
    assert "py-feat/retinaface_r34/model.safetensors" in line and "HF_HUB_OFFLINE" in line

    partial = tmp_path / "partial"  # everything but the AU classifiers
    for repo, names in REQUIRED_FILES.items():
        for name in names:
            if repo != "py-feat/xgb_au":
                target = cached_file_path(partial, repo, name, "r1")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(cached_file_path(weights, repo, name))
                (target.parents[2] / "refs").mkdir(exist_ok=True)
                (target.parents[2] / "refs" / "main").write_text("r1")
    r = invoke("extract", DATA / "with_sidecar.mp4", "--config", "pyfeat", "--pyfeat-weights", partial,
               "-o", tmp_path / "b.pkl")
    line = next(ln for ln in r.output.splitlines() if ln.startswith("error: "))
    assert r.exit_code == 1
    assert f"from {partial}: py-feat/xgb_au/xgb_au_classifier_v2.skops (" in line
    assert line.count("hf download") == 1 and "retinaface" not in line


@pytest.mark.gpu
def test_runs_on_cuda(weights):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fz = PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat", pyfeat_device="cuda", pyfeat_weights=str(weights)))
    vf = fz(frames_of("speech_face.mp4", fps=4))
    assert np.isfinite(vf.features).all() and vf.face_found.any()


@pytest.mark.skipif(not os.environ.get("ALMT_PYFEAT_REAL_WEIGHTS"),
                    reason="set ALMT_PYFEAT_REAL_WEIGHTS to a folder of py-feat's trained weights")
def test_trained_weights_find_faces_where_there_are_faces():
    fz = PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat", pyfeat_device="cpu",
                                           pyfeat_weights=os.environ["ALMT_PYFEAT_REAL_WEIGHTS"]))
    assert fz(frames_of("speech_face.mp4", fps=4)).face_fraction > 0.9
    assert fz(frames_of("no_face.mp4", fps=4)).face_fraction == 0.0


def test_batch_size_changes_neither_the_schedule_nor_the_features(detector):
    """Where batches end must not move the detections: the same clip in batches of 3, 5 and 16
    frames gets the same detector schedule and the same features (re-detections included)."""
    frames = list(iter_frames(DATA / "speech_face.mp4", 8, 320))
    runs = {}
    for size in (3, 5, 16):
        fz = PyFeatFaceFeaturizer(VisualConfig(backend="pyfeat", detect_every=5), detector=detector, batch_size=size)
        runs[size] = (fz(frames).features, list(fz.last_kinds))
    for size in (3, 5):
        assert runs[size][1] == runs[16][1]
        np.testing.assert_allclose(runs[size][0], runs[16][0], atol=1e-4)
    assert [k for k in runs[16][1][::5]] == ["scheduled"] * len(runs[16][1][::5])
