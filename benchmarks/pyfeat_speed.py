"""Speed of the py-feat face backend: frames per second of ``PyFeatFaceFeaturizer``.

Runs py-feat's real models (``Detectorv1``) on a clip's frames, decoded once beforehand at the
config's fps and max_side (so decoding is not counted; its time is printed on its own), with the
face detector on every frame (``detect_every 1``) and every k frames, and at several batch sizes;
on CUDA too when a GPU is present. The weights are RANDOM (``scripts/make_pyfeat_weights.py``,
built into a temporary folder unless ``--weights`` names one): they cost the same compute as the
trained ones, but the features are meaningless. The random detector finds a "face" in nearly every
frame, as the trained one does in this clip, so every frame goes through the landmark, AU and
emotion models. Each measurement follows a warm-up run on the first batch; the load average is
printed with it (another job may share the machine). For reference, py-feat's own
``Detectorv1.detect()`` loop is timed on the same frames (``--no-baseline`` skips it).

Usage: python benchmarks/pyfeat_speed.py [--weights DIR] [--video PATH] [--config pyfeat]
       [--detect-every 1,5] [--batch-sizes 4,16,32] [--device auto] [--max-side N] [--seconds 20]
       [--no-baseline]
Needs py-feat (``make pyfeat-env``; run with ``.venv-pyfeat/bin/python``). Prints one line per
measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_VIDEO = REPO.parent / "shared" / "media" / "WolfgangLanger_Pexels.mp4"


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def measure(detector, visual, frames, detect_every: int, batch_size: int, device: str) -> None:
    from almt_pipeline.extractors.pyfeat_backend import PyFeatFaceFeaturizer

    cfg = dataclasses.replace(visual, detect_every=detect_every, pyfeat_batch_size=batch_size)
    fz = PyFeatFaceFeaturizer(cfg, detector=detector)
    fz(frames[:batch_size])  # warm-up
    before = load()
    start = time.perf_counter()
    vf = fz(frames)
    seconds = time.perf_counter() - start
    stats = fz.last_stats
    print(f"pyfeat {device} detect_every={detect_every} batch={batch_size}: {len(frames)} frames in "
          f"{seconds:.1f} s = {len(frames) / seconds:.2f} frames/s ({1000 * seconds / len(frames):.0f} ms/frame; "
          f"detector on {stats['detected']} frames, {stats['tracked']} tracked, face in "
          f"{100 * vf.face_fraction:.0f}%; {before} -> {load()})", flush=True)


def measure_parts(detector, frames, batch_size: int, device: str, repeats: int = 3) -> None:
    """The two costliest models alone, per frame: RetinaFace on whole frames, ResMaskNet (emotions)
    on one 224 px face crop per frame."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.stack([f for _, f in frames[:batch_size]])).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    crops = torch.rand(batch_size, 3, 224, 224, device=detector.device)
    timings = {}
    for name, run in (("RetinaFace", lambda: detector.facepose_detector(x)),
                      ("ResMaskNet", lambda: detector.emotion_detector(crops))):
        with torch.inference_mode():
            run()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        timings[name] = 1000 * (time.perf_counter() - start) / repeats / batch_size
    h, w = frames[0][1].shape[:2]
    print(f"pyfeat {device} parts batch={batch_size}: RetinaFace {timings['RetinaFace']:.0f} ms/frame at {w}x{h}, "
          f"ResMaskNet {timings['ResMaskNet']:.0f} ms/face; {load()}", flush=True)


def measure_detect(detector, frames, batch_size: int, device: str) -> None:
    """py-feat's own ``Detectorv1.detect(tensor)`` per batch (what this backend called before it
    ran py-feat's steps itself): the face detector on every frame, a ``Fex`` table per call. The
    random detector proposes several boxes per frame and detect() would analyse them all, so its
    output is cut to the largest box, as many faces as the trained detector finds in this clip."""
    import contextlib
    import io

    import numpy as np
    import torch

    from almt_pipeline.extractors.pyfeat_track import largest_face

    retina = detector.facepose_detector
    real = retina.forward

    def one_face(img):
        return [[] if (box := largest_face(found, 0.5)) is None else [box.tolist()] for found in real(img)]

    batches = [torch.from_numpy(np.stack([f for _, f in frames[i:i + batch_size]])).permute(0, 3, 1, 2)
               for i in range(0, len(frames), batch_size)]  # (B, 3, H, W) uint8
    retina.forward = one_face
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # detect() draws a progress bar even when told not to
            detector.detect(batches[0], data_type="tensor", batch_size=batch_size, progress_bar=False)  # warm-up
            before = load()
            start = time.perf_counter()
            for x in batches:
                detector.detect(x, data_type="tensor", batch_size=len(x), progress_bar=False)
            seconds = time.perf_counter() - start
    finally:
        del retina.forward
    print(f"pyfeat {device} Detectorv1.detect() batch={batch_size}: {len(frames)} frames in {seconds:.1f} s = "
          f"{len(frames) / seconds:.2f} frames/s ({1000 * seconds / len(frames):.0f} ms/frame; py-feat's own loop, "
          f"detector on every frame; {before} -> {load()})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="py-feat weights folder (default: random, built here)")
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--config", default="pyfeat", help="config whose extract.visual (fps, max_side) is used")
    parser.add_argument("--detect-every", default="1,5", help="comma-separated values of detect_every")
    parser.add_argument("--batch-sizes", default="4,16,32", help="comma-separated batch sizes (at the config's "
                        "detect_every; the detect_every runs use the config's batch size)")
    parser.add_argument("--device", default="auto", help="auto (cpu, and cuda when present), cpu or cuda")
    parser.add_argument("--max-side", type=int, help="override extract.visual.max_side (frame size)")
    parser.add_argument("--seconds", type=float, default=20.0, help="use at most this much of the clip")
    parser.add_argument("--no-baseline", action="store_true", help="skip timing py-feat's own detect() loop")
    args = parser.parse_args()

    import torch

    from almt_pipeline.config import load_config
    from almt_pipeline.extractors.pyfeat_backend import build_pyfeat_detector
    from almt_pipeline.media import iter_frames

    visual = load_config(args.config).extract.visual
    if args.max_side:
        visual = dataclasses.replace(visual, max_side=args.max_side)
    start = time.perf_counter()
    frames = [(t, f) for t, f in iter_frames(args.video, visual.fps, visual.max_side) if t < args.seconds]
    h, w = frames[0][1].shape[:2]
    print(f"{args.video.name}: {len(frames)} frames of {w}x{h} at {visual.fps:g} fps, decoded in "
          f"{time.perf_counter() - start:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; {load()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            weights = Path(tmp) / "weights"
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_pyfeat_weights.py"), str(weights)],
                           check=True)
        devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
        for device in devices:
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(f"pyfeat {device}: skipped, no CUDA device here", flush=True)
                continue
            start = time.perf_counter()
            detector = build_pyfeat_detector(device, weights)
            print(f"pyfeat {device}: Detectorv1 built in {time.perf_counter() - start:.1f} s", flush=True)
            measure_parts(detector, frames, visual.pyfeat_batch_size, device)
            if not args.no_baseline:
                measure_detect(detector, frames, visual.pyfeat_batch_size, device)
            for k in (int(v) for v in args.detect_every.split(",")):
                measure(detector, visual, frames, k, visual.pyfeat_batch_size, device)
            for b in (int(v) for v in args.batch_sizes.split(",")):
                if b != visual.pyfeat_batch_size:
                    measure(detector, visual, frames, visual.detect_every, b, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
