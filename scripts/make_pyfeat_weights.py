#!/usr/bin/env python3
"""Write a cache of RANDOM py-feat model weights, for tests and speed measurement only.

    python scripts/make_pyfeat_weights.py .pyfeat-weights          # then
    almt extract clips/ --config pyfeat --pyfeat-weights .pyfeat-weights

THE WEIGHTS WRITTEN HERE ARE RANDOM. Features extracted with them are meaningless numbers: the
"faces" are wherever a random network happens to respond, the action units and emotions are noise.
They exist so that py-feat's real code (``feat.detector.Detectorv1``: RetinaFace, MobileFaceNet,
the XGBoost AU classifiers, ResMaskNet and the landmark pose MLP) can run without internet, in
tests and in speed measurements: random weights cost the same compute as the trained ones. For real
features let py-feat download its weights (see README.md, "The py-feat backend").

The folder gets py-feat's Hugging Face cache layout (what ``hf_hub_download(repo_id, filename,
cache_dir=DIR)`` reads): ``models--py-feat--NAME/refs/main`` holding a revision string and the
file under ``models--py-feat--NAME/snapshots/<revision>/FILE``. Every model is built with py-feat's
own classes, so py-feat loads the state dicts strictly; the AU file holds real scikit-learn scalers
and PCAs and one xgboost classifier per AU, fitted on seeded random data of the width py-feat's HOG
+ landmark features have. Three parts are random but shaped, so that a run behaves like one with
trained weights where the pipeline's control flow depends on it:

- RetinaFace: only one anchor type (64 px boxes at stride 16) can score as a face, with a
  logit that grows with the feature energy. The network has no biases, so a frame of RetinaFace's
  mean colour (RGB 123, 117, 104) has all-zero features and no face: the tests use such frames as
  frames without a face. On other frames most positions pass the threshold, non-maximum
  suppression leaves several boxes, and the pipeline keeps the largest. (An untouched random
  RetinaFace calls nearly every prior of every level a face; its post-processing then takes
  minutes per frame.)
- MobileFaceNet: the landmarks are a mean face shape in the crop plus a small input-dependent
  jitter (the output layer's BatchNorm is scaled down and biased to that shape).
- box regressions and the pose MLP's output scale are kept small (boxes stay near their
  anchors, poses within a few degrees).

ResMaskNet (143 M parameters) is stored in float16, which halves its file; py-feat's strict
``load_state_dict`` casts it to float32. Seeded: the same seed and torch version write the same
weights. Builds in 10-20 s on 2 CPU cores (half of it importing py-feat); 382 MB (365 MiB).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

# xgboost before torch: py-feat's own rule (feat/detector.py) against an OpenMP clash on load.
import xgboost  # isort: skip
import torch  # isort: skip

from almt_pipeline.extractors.pyfeat_weights import REQUIRED_FILES, cached_file_path

REVISION = hashlib.sha1(b"almt-pipeline random py-feat weights, layout 1").hexdigest()
FACE_LEVEL, FACE_ANCHOR = 1, 0  # RetinaFace FPN level 1 (stride 16), anchor 0 (64 px)
FACE_SHARE = 0.9  # share of a textured calibration frame's positions that score as a face (before NMS)
LOGIT_SPREAD = 4.0  # std of the face logit over positions: graded scores, not all 0 or 1
BOX_JITTER = 0.5  # std of the box regression outputs (x 0.1 of the anchor size: ~3 px)
LANDMARK_JITTER = 0.01  # std of the landmarks around the mean shape, in crop widths
N_FIT = 64  # samples of random data the AU scalers, PCAs and classifiers are fitted on
N_PCA = 16  # PCA components per face region (py-feat's trained files keep more)


def write_file(cache: Path, repo: str, filename: str) -> Path:
    """The path to write ``repo``'s ``filename`` to, with its folders and ``refs/main`` made."""
    path = cached_file_path(cache, repo, filename, REVISION)
    path.parent.mkdir(parents=True, exist_ok=True)
    refs = path.parents[2] / "refs" / "main"
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(REVISION)
    return path


def calibration_frames(rng: np.random.Generator, n: int = 8, size: tuple[int, int] = (180, 320)) -> np.ndarray:
    """(n, H, W, 3) uint8 textured frames: ellipses of random colours on a random background."""
    import cv2

    h, w = size
    frames = []
    for _ in range(n):
        img = np.full((h, w, 3), rng.integers(0, 256, 3), np.float32)
        for _ in range(6):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(10, 60)), int(rng.integers(10, 60)))
            colour = [float(c) for c in rng.integers(0, 256, 3)]
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        img += rng.normal(0.0, 8.0, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def retinaface(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    from feat.face_detectors.Retinaface.Retinaface_model import RETINAFACE_R34_CFG, RetinaFace
    from feat.face_detectors.Retinaface.Retinaface_test import _RGB_MEAN

    net = RetinaFace(RETINAFACE_R34_CFG).eval()
    captured: dict[str, list[torch.Tensor]] = {}
    hook = net.ClassHead.register_forward_hook(lambda m, args, out: captured.__setitem__("x", args[0]))

    def level_features(frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() - _RGB_MEAN  # (B, 3, H, W)
        with torch.inference_mode():
            net(x)
        return captured["x"][FACE_LEVEL]  # (B, C, h, w), >= 0 (after SSH's ReLU)

    textured = level_features(calibration_frames(rng))
    hook.remove()
    direction = textured.mean(dim=(0, 2, 3))
    direction /= direction.norm()  # (C,), >= 0
    energy = torch.einsum("c,bchw->bhw", direction, textured)  # (B, h, w), >= 0
    scale = LOGIT_SPREAD / float(energy.std())
    bias = -scale * float(torch.quantile(energy.flatten(), 1.0 - FACE_SHARE))  # logit = bias + scale * energy
    if bias > -1.0:  # a frame of the mean colour (zero features) must stay below the threshold
        raise SystemExit(f"calibration failed: a mean-colour frame reaches face logit {bias:.2f}")

    n_anchors = net.cfg["num_anchors"]
    with torch.no_grad():
        for level, conv in enumerate(net.ClassHead._convs):  # channels: (anchor, [not-face, face])
            conv.weight.zero_()
            conv.bias.zero_()
            for a in range(n_anchors):
                conv.bias[2 * a + 1] = -30.0  # never a face...
            if level == FACE_LEVEL:  # ...except this anchor, scored by the energy logit
                conv.weight[2 * FACE_ANCHOR + 1, :, 0, 0] = scale * direction
                conv.bias[2 * FACE_ANCHOR + 1] = bias
        for conv, feats in zip(net.BboxHead._convs, (None, textured, None)):
            conv.bias.zero_()
            std = float(feats.std()) if feats is not None else 1.0
            w = torch.from_numpy(rng.normal(0.0, 1.0, tuple(conv.weight.shape))).float()
            conv.weight.copy_(w * BOX_JITTER / (std * conv.weight.shape[1] ** 0.5))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def mean_face_shape() -> np.ndarray:
    """(68, 2) in [0, 1] crop coordinates: py-feat's neutral face, placed in a detector crop."""
    from feat.utils.io import get_resource_path

    with open(Path(get_resource_path()) / "neutral_face_coordinates.csv", newline="") as f:
        pts = np.array([[float(r["x"]), float(r["y"])] for r in csv.DictReader(f)])  # (68, 2)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return np.array([0.14, 0.22]) + (pts - lo) / (hi - lo) * np.array([0.72, 0.70])


def mobilefacenet(rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The landmark model's state dict and the mean shape it is biased to, (68, 2)."""
    from feat.landmark_detectors.mobilefacenet_test import MobileFaceNet

    net = MobileFaceNet([112, 112], 136, device="cpu").eval()
    crops = torch.from_numpy(calibration_frames(rng, 8, (112, 112))).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        raw = net(crops)[0]  # (8, 136), BatchNorm1d still the identity
    shape = mean_face_shape()
    with torch.no_grad():
        net.output_layer.bn.weight.fill_(LANDMARK_JITTER / max(float(raw.std()), 1e-6))
        net.output_layer.bn.bias.copy_(torch.from_numpy(shape.reshape(-1)).float())  # x0, y0, x1, ...
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, shape


def resmasknet() -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    from feat.emo_detectors.ResMaskNet.resmasknet_test import ResMasking
    from torch import nn

    config = {"in_channels": 3, "num_classes": 7}
    net = ResMasking("", in_channels=config["in_channels"])
    net.fc = nn.Sequential(nn.Dropout(0.4), nn.Linear(512, config["num_classes"]))
    # float16 halves the file (143 M parameters); py-feat's load_state_dict casts to float32
    return config, {k: v.detach().clone().half() if v.is_floating_point() else v.detach().clone()
                    for k, v in net.state_dict().items()}


def pose_mlp() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    from feat.utils.face_pose_mlp import PoseMLP

    hidden, dropout = [512, 256, 128], 0.15
    net = PoseMLP(hidden=tuple(hidden), dropout=dropout, use_layernorm=True)
    meta = {"architecture": {"hidden": hidden, "dropout": dropout, "output_normalization": {
        "mean": [0.0] * 6, "std": [5.0, 5.0, 5.0, 1.0, 1.0, 1.0]}},
        "note": "RANDOM weights written by almt-pipeline scripts/make_pyfeat_weights.py"}
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, meta


def hog_width(shape: np.ndarray) -> int:
    """Width of py-feat's HOG features of one 112 px face crop (what its AU scalers take)."""
    from feat.utils.face_mask import extract_hog_features_batched

    crop = torch.zeros((1, 3, 112, 112))
    landmarks = torch.from_numpy(shape.reshape(1, -1)).float()  # (1, 136) in [0, 1]
    features, _ = extract_hog_features_batched(crop, landmarks)
    return int(features.shape[1])


def xgb_au(rng: np.random.Generator, n_hog: int) -> object:
    """py-feat's XGB AU detector with fitted scalers, PCAs and one classifier per AU."""
    from feat.au_detectors.StatLearning.SL_test import XGBClassifier
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    hog = rng.normal(size=(N_FIT, n_hog)).astype(np.float32)
    parts = {}
    for region in ("upper", "lower", "full"):
        scaler = StandardScaler().fit(hog)
        parts[f"scaler_{region}"] = scaler
        parts[f"pca_model_{region}"] = PCA(n_components=N_PCA, random_state=0).fit(scaler.transform(hog))
    detector = XGBClassifier()
    classifiers = {}
    for i, key in enumerate(detector.au_keys):
        x = rng.normal(size=(N_FIT, N_PCA + 136)).astype(np.float32)
        y = np.arange(N_FIT) % 2  # both classes present
        clf = xgboost.XGBClassifier(n_estimators=4, max_depth=2, random_state=i, n_jobs=1)
        classifiers[key] = clf.fit(x, y)
    detector.load_weights(classifiers=classifiers, **parts)
    return detector


def build(cache: Path, seed: int) -> None:
    from safetensors.torch import save_file
    from skops.io import dump

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    files = {(repo, name) for repo, names in REQUIRED_FILES.items() for name in names}

    save_file(retinaface(rng), str(write_file(cache, "py-feat/retinaface_r34", "model.safetensors")))
    landmarks, shape = mobilefacenet(rng)
    torch.save({"state_dict": landmarks},
               write_file(cache, "py-feat/mobilefacenet", "mobilefacenet_model_best.pth.tar"))
    config, emotion = resmasknet()
    write_file(cache, "py-feat/resmasknet", "config.json").write_text(json.dumps(config))
    torch.save({"net": emotion}, write_file(cache, "py-feat/resmasknet", "ResMaskNet_Z_resmasking_dropout1_rot30.pth"))
    pose, meta = pose_mlp()
    save_file(pose, str(write_file(cache, "py-feat/pose_mlp_v2", "pose_mlp_v2.safetensors")))
    write_file(cache, "py-feat/pose_mlp_v2", "pose_mlp_v2.json").write_text(json.dumps(meta, indent=1))
    dump(xgb_au(rng, hog_width(shape)), write_file(cache, "py-feat/xgb_au", "xgb_au_classifier_v2.skops"))
    (cache / "RANDOM_WEIGHTS.txt").write_text(
        "These py-feat weights are RANDOM (scripts/make_pyfeat_weights.py): for tests and speed "
        "measurement only. Features extracted with them are meaningless.\n")
    written = {(repo, name) for repo, names in REQUIRED_FILES.items() for name in names
               if cached_file_path(cache, repo, name).is_file()}
    assert written == files, f"not written: {sorted(files - written)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the cache to (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.out, args.seed)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: RANDOM py-feat weights (tests and speed measurement only), {size / 1e6:.0f} MB "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
