#!/usr/bin/env python3
"""Generate the committed sample media: ``samples/`` and ``tests/data/``.

The generated files are committed, so nobody needs to run this script to use
the project. It is kept so anyone can remake (or change) the samples. It needs
the Debian/Ubuntu packages ``ffmpeg`` (with ``ffprobe``) and ``espeak-ng``, and
a folder holding the three source files described in ``samples/README.md``:

* ``WolfgangLanger_Pexels.mp4`` -- 19.7 s video of a woman, upset/crying from
  0 to 9 s and smiling/laughing from 10 s to the end (Pexels licence);
* ``no_face.mp4`` -- title of *Caminandes* (Blender Foundation, CC BY);
* ``astronaut.png`` -- NASA portrait of a smiling astronaut (public domain).

Usage::

    python scripts/make_samples.py --media /path/to/media            # both sets
    python scripts/make_samples.py --media /path/to/media --only tests
    python scripts/make_samples.py --check                           # ffprobe table only

Speech is synthesised with espeak-ng from the sentences below and muxed as
the clip's audio track. Every random choice comes from a generator seeded
with the clip's name and the encoders run with bit-exact flags, so a rerun
with the same tool versions reproduces the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FACE_VIDEO = "WolfgangLanger_Pexels.mp4"
CARTOON_VIDEO = "no_face.mp4"
PHOTO = "astronaut.png"

# Time windows of the face video (seconds).
CRYING_WINDOW = (0.2, 9.0)
SMILING_WINDOW = (10.0, 19.6)
# Crop of the 512x512 photo around the face (x, y, w, h); 16:9 like the output.
PHOTO_CROP = (33, 12, 384, 216)
PHOTO_WORK_SCALE = 4  # the photo is upscaled before zoompan to avoid jitter

WIDTH, HEIGHT = 320, 180
FPS = 24
CRF = 30
AUDIO_RATE = 22050
AUDIO_BITRATE = "40k"
LEAD_SILENCE = 0.15  # seconds of silence before the speech
TAIL = 0.3  # clip length = speech length + TAIL
MIN_CLIP, MAX_CLIP = 2.5, 4.5  # sample dataset clip length bounds (seconds)

# espeak-ng voice and base speed (words per minute) of each "speaker"
VOICES = {
    "us_male": ("en-us", 150),
    "us_female": ("en-us+f3", 160),
    "gb_male": ("en-gb", 145),
}
SPEED_RANGE = (140, 170)


@dataclass(frozen=True)
class Clip:
    """One labelled clip: who speaks, what, which face is shown, which split."""

    video_id: str
    clip_id: str
    mode: str  # train / valid / test
    label: float  # sentiment in [-3, 3]
    face: str  # "crying" | "smiling" | "photo"
    text: str

    @property
    def annotation(self) -> str:
        if self.label > 0.5:
            return "Positive"
        if self.label < -0.5:
            return "Negative"
        return "Neutral"


def _clips(video_id: str, rows: list[tuple[str, float, str, str]]) -> list[Clip]:
    return [Clip(video_id, str(i), m, lab, face, text) for i, (m, lab, face, text) in enumerate(rows, 1)]


# Sentences written for this project, movie-review opinions as in CMU-MOSI.
# The face shown does not follow the sentiment everywhere: the smiling photo
# carries negative speech too, and neutral speech goes over every face.
SAMPLE_CLIPS: list[Clip] = [
    *_clips("us_male", [
        ("train", 3.0, "smiling", "I absolutely loved this movie, it was wonderful."),
        ("train", 2.6, "photo", "The acting was brilliant and the story moved me."),
        ("train", 2.0, "smiling", "The music was great and the jokes really worked."),
        ("valid", 2.4, "smiling", "What a beautiful film, I would watch it again."),
        ("train", -3.0, "crying", "I hated this movie, it was a total waste of time."),
        ("train", -2.6, "photo", "The acting was terrible and the plot made no sense."),
        ("train", -2.2, "crying", "The jokes were awful and nobody in the theater laughed."),
        ("valid", -2.4, "crying", "What a boring film, I almost fell asleep."),
        ("train", 0.0, "crying", "The movie is about two hours long."),
        ("train", 0.0, "photo", "It was released in theaters last spring."),
        ("train", 0.2, "smiling", "It is based on a novel from the nineteen eighties."),
        ("valid", 0.0, "smiling", "The story takes place in a small town."),
    ]),
    *_clips("us_female", [
        ("train", 2.8, "smiling", "Honestly, this was one of the best films this year."),
        ("train", 2.0, "smiling", "I really enjoyed the characters, they felt so real."),
        ("train", 2.2, "photo", "The ending was perfect and it made me smile."),
        ("test", 1.8, "smiling", "It is a fun, charming movie for the whole family."),
        ("train", -2.8, "crying", "Honestly, this was the worst film I have seen this year."),
        ("train", -2.0, "crying", "The characters were flat and I did not care about them."),
        ("train", -2.0, "photo", "The ending was a huge disappointment for me."),
        ("test", -1.8, "photo", "It is far too long and painfully slow."),
        ("train", 0.0, "smiling", "I watched it on a Tuesday evening with a friend."),
        ("train", -0.2, "crying", "Some parts were okay and some parts were not."),
        ("train", 0.0, "photo", "Most of the film is shot in black and white."),
        ("test", 0.0, "crying", "The main character works at a bookstore."),
    ]),
    *_clips("gb_male", [
        ("train", 2.4, "smiling", "The director did an amazing job with this one."),
        ("train", 1.6, "photo", "I liked it a lot more than I expected."),
        ("valid", 2.6, "photo", "The visuals are stunning and the cast is fantastic."),
        ("test", 1.5, "smiling", "A pretty good movie with some lovely moments."),
        ("train", -2.2, "crying", "The director ruined a story that had real promise."),
        ("train", -1.6, "crying", "I was pretty let down, it was not very good."),
        ("valid", -2.4, "photo", "The dialogue is clumsy and the effects look cheap."),
        ("test", -1.5, "crying", "It was a bit dull and I did not enjoy it much."),
        ("train", 0.0, "photo", "There are three main characters in the film."),
        ("train", 0.4, "smiling", "The second half is a little better than the first."),
        ("valid", -0.4, "photo", "I think it was fine, nothing special."),
        ("test", 0.2, "smiling", "It is a sequel, so you may want to see the first one."),
    ]),
]

# Unlabelled demo clip for `almt predict` (not part of the dataset).
NEW_CLIP_TEXT = "This was a delightful movie and I smiled the whole way through."
NEW_CLIP_VOICE = ("en-us", 150)

# Sentences of the test clips.
TEST_SENTENCES = {
    "speech_face": "The film was wonderful and I loved it.",
    "with_sidecar": "The plot was dull and far too slow.",
    "with_srt": "It is a story about a small town.",
    "truncated": "The cast was great, and the music was even better.",
    "no_audio": "",  # video only
    "stereo": "I would happily watch this film again.",
    "rotated": "The movie was good, but the ending was weak.",
}
SRT_CUES = [(0.0, 1.3, "It is a story"), (1.3, 2.6, "about a small town.")]

# Tiny labelled dataset for fast end-to-end tests.
MINI_CLIPS: list[Clip] = [
    Clip("spk1", "1", "train", 2.4, "smiling", "I loved this movie."),
    Clip("spk1", "2", "train", -2.4, "crying", "I hated this movie."),
    Clip("spk2", "1", "valid", 2.0, "photo", "A wonderful film."),
    Clip("spk2", "2", "valid", -2.0, "crying", "A terrible film."),
    Clip("spk1", "3", "test", 2.2, "smiling", "Great acting, great story."),
    Clip("spk2", "3", "test", -2.2, "photo", "Boring and far too long."),
]
MINI_VOICES = {"spk1": ("en-us", 160), "spk2": ("en-us+f3", 165)}
MINI_SIZE = (320, 180)
MINI_CRF = 34

LABEL_COLUMNS = ["video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V", "annotation", "mode"]

# --------------------------------------------------------------------------- tools

FFMPEG_BASE = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
BITEXACT = ["-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"]


def run(cmd: list[str]) -> str:
    """Run a command (argument list, no shell); raise with its stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
    return proc.stdout


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        sys.exit(f"error: missing tools: {', '.join(missing)} (apt-get install ffmpeg espeak-ng)")


def speak(text: str, voice: str, speed: int, out: Path) -> float:
    """Synthesise ``text`` to a 22050 Hz mono WAV with espeak-ng; return its duration (s)."""
    run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text])
    with wave.open(str(out), "rb") as w:
        return w.getnframes() / w.getframerate()


def rng_for(name: str) -> random.Random:
    return random.Random(f"almt-samples/{name}")


# --------------------------------------------------------------------------- video sources


def face_source(face: str, duration: float, name: str, media: Path,
                size: tuple[int, int] = (WIDTH, HEIGHT)) -> tuple[list[str], str]:
    """Input arguments and a filter chain producing ``[v]`` for one face source.

    ``crying``/``smiling``: a segment of the face video at a start offset drawn
    from that window. ``photo``: the still photo turned into a moving clip
    (slow rotation, zoom and pan, with per-clip phases). ``cartoon``: a
    segment of the cartoon (no face).
    """
    w, h = size
    rng = rng_for(name)
    if face in ("crying", "smiling"):
        lo, hi = CRYING_WINDOW if face == "crying" else SMILING_WINDOW
        start = round(rng.uniform(lo, max(lo, hi - duration)), 2)
        inputs = ["-ss", f"{start:.2f}", "-t", f"{duration:.3f}", "-i", str(media / FACE_VIDEO)]
        chain = f"[0:v]scale={w}:{h}:flags=bicubic,fps={FPS},setsar=1,format=yuv420p[v]"
        return inputs, chain
    if face == "cartoon":
        start = 1.0
        inputs = ["-ss", f"{start:.2f}", "-t", f"{duration:.3f}", "-i", str(media / CARTOON_VIDEO)]
        chain = f"[0:v]scale={w}:{h}:flags=bicubic,fps={FPS},setsar=1,format=yuv420p[v]"
        return inputs, chain
    if face == "photo":
        cx, cy, cw, ch = PHOTO_CROP
        big_w, big_h = cw * PHOTO_WORK_SCALE, ch * PHOTO_WORK_SCALE
        angle = rng.uniform(0.03, 0.05)  # radians, peak rotation
        rot_period = rng.uniform(2.0, 3.0)  # seconds
        zoom_period = rng.uniform(40, 70)  # frames
        pan_x, pan_y = rng.uniform(0.03, 0.05), rng.uniform(0.015, 0.03)  # fraction of width/height
        ph = [round(rng.uniform(0, 2 * math.pi), 3) for _ in range(4)]
        rotate = f"rotate=a='{angle:.4f}*sin(2*PI*t/{rot_period:.3f}+{ph[0]})':fillcolor=gray"
        zoom = (
            f"zoompan=z='1.17+0.05*sin(2*PI*on/{zoom_period:.2f}+{ph[1]})'"
            f":x='iw/2-iw/zoom/2+{pan_x:.4f}*iw*sin(2*PI*on/53+{ph[2]})'"
            f":y='ih/2-ih/zoom/2+{pan_y:.4f}*ih*sin(2*PI*on/37+{ph[3]})'"
            f":d=1:s={w}x{h}:fps={FPS}"
        )
        inputs = ["-loop", "1", "-framerate", str(FPS), "-t", f"{duration:.3f}", "-i", str(media / PHOTO)]
        chain = (f"[0:v]crop={cw}:{ch}:{cx}:{cy},scale={big_w}:{big_h}:flags=bicubic,"
                 f"{rotate},{zoom},setsar=1,format=yuv420p[v]")
        return inputs, chain
    raise ValueError(f"unknown face source {face!r}")


def video_args(crf: int = CRF) -> list[str]:
    return ["-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p"]


def audio_args(rate: int = AUDIO_RATE, channels: int = 1, bitrate: str = AUDIO_BITRATE) -> list[str]:
    return ["-c:a", "aac", "-b:a", bitrate, "-ar", str(rate), "-ac", str(channels)]


def make_clip(out: Path, *, face: str, name: str, media: Path, duration: float, speech: Path | None,
              size: tuple[int, int] = (WIDTH, HEIGHT), crf: int = CRF, video: bool = True,
              source_audio: bool = False) -> None:
    """Encode one clip of ``duration`` seconds: the face video (unless ``video`` is False) and
    the speech WAV as audio, or the video source's own audio with ``source_audio``."""
    inputs: list[str] = []
    chains: list[str] = []
    maps: list[str] = []
    n_inputs = 0
    if video:
        v_inputs, v_chain = face_source(face, duration, name, media, size)
        inputs += v_inputs
        chains.append(v_chain)
        maps += ["-map", "[v]"]
        n_inputs += 1
    if speech is not None:
        inputs += ["-i", str(speech)]
        chains.append(f"[{n_inputs}:a]aresample={AUDIO_RATE},adelay={int(LEAD_SILENCE * 1000)}:all=1,apad[a]")
        maps += ["-map", "[a]"]
    elif source_audio:
        chains.append(f"[0:a]aresample={AUDIO_RATE}[a]")
        maps += ["-map", "[a]"]
    cmd = [*FFMPEG_BASE, *inputs, "-filter_complex", ";".join(chains), *maps, "-t", f"{duration:.3f}"]
    if video:
        cmd += video_args(crf)
    if speech is not None or source_audio:
        cmd += audio_args()
    if out.suffix in (".mp4", ".m4a"):
        cmd += ["-movflags", "+faststart"]
    cmd += [*BITEXACT, str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    run(cmd)


def clip_length(speech_seconds: float, lo: float = MIN_CLIP, hi: float = MAX_CLIP) -> float:
    total = round(max(lo, speech_seconds + TAIL), 2)
    if total > hi:
        raise ValueError(f"speech of {speech_seconds:.2f} s makes a clip longer than {hi} s")
    return total


def write_label_csv(path: Path, clips: list[Clip]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for c in clips:
            writer.writerow([c.video_id, c.clip_id, c.text, f"{c.label:.1f}", "", "", "", c.annotation, c.mode])


def build_dataset(root: Path, clips: list[Clip], voices: dict[str, tuple[str, int]], media: Path,
                  tmp: Path, *, size: tuple[int, int], crf: int, length_bounds: tuple[float, float]) -> None:
    """Write ``root/label.csv`` and ``root/Raw/<video_id>/<clip_id>.mp4``."""
    if root.exists():
        shutil.rmtree(root)
    (root / "Raw").mkdir(parents=True)
    for c in clips:
        name = f"{root.name}/{c.video_id}/{c.clip_id}"
        voice, base_speed = voices[c.video_id]
        speed = min(SPEED_RANGE[1], max(SPEED_RANGE[0], base_speed + rng_for(name + "/speed").randint(-8, 8)))
        wav = tmp / f"{root.name}_{c.video_id}_{c.clip_id}.wav"
        seconds = speak(c.text, voice, speed, wav)
        duration = clip_length(seconds, *length_bounds)
        make_clip(root / "Raw" / c.video_id / f"{c.clip_id}.mp4", face=c.face, name=name, media=media,
                  duration=duration, speech=wav, size=size, crf=crf)
    write_label_csv(root / "label.csv", clips)


# --------------------------------------------------------------------------- samples/


def build_samples(media: Path, tmp: Path) -> None:
    samples = REPO / "samples"
    build_dataset(samples / "sample_dataset", SAMPLE_CLIPS, VOICES, media, tmp,
                  size=(WIDTH, HEIGHT), crf=CRF, length_bounds=(MIN_CLIP, MAX_CLIP))
    wav = tmp / "new_clip.wav"
    seconds = speak(NEW_CLIP_TEXT, *NEW_CLIP_VOICE, wav)
    make_clip(samples / "new_clip.mp4", face="smiling", name="new_clip", media=media,
              duration=clip_length(seconds, 4.0, 6.0), speech=wav)


# --------------------------------------------------------------------------- tests/data


def build_tests(media: Path, tmp: Path) -> None:
    data = REPO / "tests" / "data"
    data.mkdir(parents=True, exist_ok=True)
    wavs: dict[str, tuple[Path, float]] = {}
    for key, text in TEST_SENTENCES.items():
        if text:
            wav = tmp / f"test_{key}.wav"
            wavs[key] = (wav, speak(text, "en-us", 160, wav))

    def face_speech(out: str, key: str, face: str = "smiling", **kw: object) -> None:
        wav, seconds = wavs[key]
        make_clip(data / out, face=face, name=f"tests/{out}", media=media,
                  duration=clip_length(seconds, 1.0, 5.0), speech=wav, **kw)  # type: ignore[arg-type]

    face_speech("speech_face.mp4", "speech_face")
    face_speech("with_sidecar.mp4", "with_sidecar", face="crying")
    (data / "with_sidecar.txt").write_text(TEST_SENTENCES["with_sidecar"] + "\n", encoding="utf-8")
    face_speech("with_srt.mp4", "with_srt", face="photo")
    (data / "with_srt.srt").write_text(srt_text(SRT_CUES), encoding="utf-8")

    # the cartoon with its music, no face
    make_clip(data / "no_face.mp4", face="cartoon", name="tests/no_face", media=media, duration=1.5,
              speech=None, source_audio=True)

    make_clip(data / "no_audio.mp4", face="crying", name="tests/no_audio", media=media, duration=2.0, speech=None)
    make_clip(data / "audio_only.mp4", face="", name="tests/audio_only", media=media,
              duration=clip_length(wavs["speech_face"][1], 1.0, 5.0), speech=wavs["speech_face"][0], video=False)
    make_clip(data / "too_short.mp4", face="smiling", name="tests/too_short", media=media, duration=0.2,
              speech=wavs["speech_face"][0])
    (data / "not_a_video.mp4").write_text("This is a plain text file, not a video.\n", encoding="utf-8")
    (data / "empty.mp4").write_bytes(b"")

    # a complete clip (moov atom first) cut to 40% of its bytes
    whole = tmp / "truncated_whole.mp4"
    wav, seconds = wavs["truncated"]
    make_clip(whole, face="smiling", name="tests/truncated", media=media,
              duration=clip_length(seconds, 1.0, 5.0), speech=wav)
    raw = whole.read_bytes()
    (data / "truncated.mp4").write_bytes(raw[: int(len(raw) * 0.4)])

    make_stereo(data / "stereo_48k.mkv", wavs["stereo"], media)
    make_rotated(data / "rotated.mp4", wavs["rotated"], media, tmp)

    # 16 kHz mono WAV of the speech_face sentence
    run([*FFMPEG_BASE, "-i", str(wavs["speech_face"][0]), "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le",
         *BITEXACT, str(data / "speech.wav")])

    mini = data / "mini_dataset"
    build_dataset(mini, MINI_CLIPS, MINI_VOICES, media, tmp, size=MINI_SIZE, crf=MINI_CRF,
                  length_bounds=(1.5, 2.5))
    build_plain_folder(data / "plain_folder", mini)


def srt_text(cues: list[tuple[float, float, str]]) -> str:
    def ts(t: float) -> str:
        ms = round(t * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    return "".join(f"{i}\n{ts(a)} --> {ts(b)}\n{text}\n\n" for i, (a, b, text) in enumerate(cues, 1))


def make_stereo(out: Path, speech: tuple[Path, float], media: Path) -> None:
    """Matroska clip, 48 kHz stereo: speech on the left, a 440 Hz tone (amplitude 1/8) on the right."""
    wav, seconds = speech
    duration = clip_length(seconds, 1.0, 5.0)
    v_inputs, v_chain = face_source("smiling", duration, "tests/stereo_48k", media)
    chains = [
        v_chain,
        (f"[1:a]aresample=48000,aformat=sample_fmts=fltp:channel_layouts=mono,"
         f"adelay={int(LEAD_SILENCE * 1000)}:all=1,apad[l]"),
        "sine=frequency=440:sample_rate=48000,aformat=sample_fmts=fltp:channel_layouts=mono[r]",
        "[l][r]join=inputs=2:channel_layout=stereo:map=0.0-FL|1.0-FR[a]",
    ]
    run([*FFMPEG_BASE, *v_inputs, "-i", str(wav), "-filter_complex", ";".join(chains),
         "-map", "[v]", "-map", "[a]", "-t", f"{duration:.3f}", *video_args(),
         *audio_args(rate=48000, channels=2, bitrate="64k"), *BITEXACT, str(out)])


def make_rotated(out: Path, speech: tuple[Path, float], media: Path, tmp: Path) -> None:
    """Frames stored turned 90 degrees clockwise (180x320) with a display matrix of 90 degrees
    counter-clockwise: a decoder that honours rotation shows an upright 320x180 face, one
    that ignores it shows a face lying on its side."""
    wav, seconds = speech
    upright = tmp / "rotated_upright.mp4"
    make_clip(upright, face="smiling", name="tests/rotated", media=media,
              duration=clip_length(seconds, 1.0, 5.0), speech=wav)
    stored = tmp / "rotated_stored.mp4"
    run([*FFMPEG_BASE, "-i", str(upright), "-vf", "transpose=clock", *video_args(), "-c:a", "copy",
         "-movflags", "+faststart", *BITEXACT, str(stored)])
    run([*FFMPEG_BASE, "-i", str(stored), "-c", "copy", "-metadata:s:v:0", "rotate=90",
         "-movflags", "+faststart", *BITEXACT, str(out)])


def build_plain_folder(root: Path, mini: Path) -> None:
    """Unlabelled folder: two good clips (one with a .txt sidecar) and a subfolder with one
    more clip and one file that is not a video."""
    if root.exists():
        shutil.rmtree(root)
    (root / "more").mkdir(parents=True)
    by_id = {(c.video_id, c.clip_id): c for c in MINI_CLIPS}
    shutil.copyfile(mini / "Raw" / "spk1" / "1.mp4", root / "good_a.mp4")
    (root / "good_a.txt").write_text(by_id[("spk1", "1")].text + "\n", encoding="utf-8")
    shutil.copyfile(mini / "Raw" / "spk2" / "2.mp4", root / "good_b.mp4")
    shutil.copyfile(mini / "Raw" / "spk1" / "3.mp4", root / "more" / "good_c.mp4")
    (root / "more" / "broken.mp4").write_text("not a video\n", encoding="utf-8")


# --------------------------------------------------------------------------- check


def probe(path: Path) -> dict:
    out = run(["ffprobe", "-v", "error", "-show_entries",
               "format=duration,size:stream=codec_type,codec_name,width,height,sample_rate,channels",
               "-of", "json", str(path)])
    return json.loads(out)


def check() -> None:
    """Print one line per media file: size, container duration and streams."""
    require_tools("ffprobe")
    files = sorted(p for base in (REPO / "samples", REPO / "tests" / "data") if base.exists()
                   for p in base.rglob("*") if p.is_file() and p.suffix in (".mp4", ".mkv", ".m4a", ".wav"))
    for p in files:
        rel = p.relative_to(REPO)
        try:
            info = probe(p)
        except RuntimeError as e:
            print(f"{rel}: {p.stat().st_size} B, unreadable ({e.args[0].splitlines()[-1]})")
            continue
        streams = ", ".join(
            f"{s['codec_type']}:{s['codec_name']}"
            + (f" {s['width']}x{s['height']}" if s["codec_type"] == "video" else "")
            + (f" {s['sample_rate']}Hz/{s['channels']}ch" if s["codec_type"] == "audio" else "")
            for s in info.get("streams", []))
        dur = info.get("format", {}).get("duration")
        print(f"{rel}: {p.stat().st_size} B, {float(dur):.2f} s, {streams}" if dur else f"{rel}: {streams}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", type=Path, help="folder with the three source files")
    parser.add_argument("--only", choices=["samples", "tests"], help="build only one of the two sets")
    parser.add_argument("--check", action="store_true", help="only print an ffprobe table of the files")
    args = parser.parse_args()
    if args.check:
        check()
        return
    if args.media is None:
        parser.error("--media is required unless --check is given")
    for name in (FACE_VIDEO, CARTOON_VIDEO, PHOTO):
        if not (args.media / name).is_file():
            sys.exit(f"error: {args.media / name} not found")
    require_tools("ffmpeg", "ffprobe", "espeak-ng")
    with tempfile.TemporaryDirectory(prefix="almt-samples-") as tmp:
        if args.only in (None, "samples"):
            build_samples(args.media, Path(tmp))
        if args.only in (None, "tests"):
            build_tests(args.media, Path(tmp))
    check()


if __name__ == "__main__":
    main()
