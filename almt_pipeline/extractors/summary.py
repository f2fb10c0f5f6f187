"""The summary ``almt extract`` prints: counts, and the clips a user should look at by name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .clip import ClipFailure, ClipResult

NAMED_CLIPS = 5  # a summary line names this many clips, then "and N more"


@dataclass
class ExtractSummary:
    out_path: Path | None
    failures_path: Path
    total: int = 0  # clips found
    done: int = 0  # clips in the output (extracted now + from cache)
    extracted: int = 0
    cached: int = 0
    failed: int = 0
    asr_clips: int = 0  # transcripts made by speech recognition
    truncated_texts: int = 0  # transcripts longer than model.text_len tokens
    truncated_ids: list[str] = field(default_factory=list)  # ... their ids
    text_len: int = 0  # model.text_len, the tokens kept per transcript
    pooled_audio: int = 0  # audio sequences pooled to model.audio_len
    pooled_vision: int = 0  # vision sequences pooled to model.vision_len
    frames: int = 0  # sampled video frames (all done clips)
    face_frames: int = 0  # ... with a face
    no_face_clips: int = 0  # clips where no frame had a face
    no_face_ids: list[str] = field(default_factory=list)  # ... their ids
    decode_error_ids: list[str] = field(default_factory=list)  # clips kept despite decode errors
    padded_audio_ids: list[str] = field(default_factory=list)  # clips whose audio was padded
    clip_seconds: float = 0.0  # media seconds extracted in this run (not cached)
    total_seconds: float = 0.0  # the whole run, model loading included
    first_start: float = 0.0  # time.time() when the first clip of this run began
    last_end: float = 0.0  # time.time() when the last clip of this run was finished
    split_counts: dict[str, int] = field(default_factory=dict)
    failures: list[ClipFailure] = field(default_factory=list)

    @property
    def no_face_fraction(self) -> float:
        return 1.0 - self.face_frames / self.frames if self.frames else 0.0

    @property
    def extract_seconds(self) -> float:
        """Wall time from the first clip's start to the last clip's end (model loading excluded)."""
        return max(0.0, self.last_end - self.first_start) if self.first_start else 0.0

    @property
    def speed(self) -> float:
        """Clip seconds extracted per second of wall time, model loading excluded."""
        seconds = self.extract_seconds or self.total_seconds
        return self.clip_seconds / seconds if seconds > 0 else 0.0

    def clip_done(self, started: float, ended: float) -> None:
        """Widen the extraction window by one clip that ran from ``started`` to ``ended``."""
        self.first_start = min(self.first_start, started) if self.first_start else started
        self.last_end = max(self.last_end, ended)

    def count(self, results: Sequence[tuple[str, ClipResult]], audio_len: int, vision_len: int) -> None:
        """Add the counters of the clips in the output, ``(id, result)`` in file order."""
        for clip_id, r in results:
            self.pooled_audio += r.audio.shape[0] > audio_len
            self.pooled_vision += r.vision.shape[0] > vision_len
            self.asr_clips += r.transcript_source == "asr"
            frames = r.vision.shape[0]
            self.frames += frames
            self.face_frames += int(round(r.face_fraction * frames))
            if r.text_truncated:
                self.truncated_texts += 1
                self.truncated_ids.append(clip_id)
            if r.face_fraction == 0.0:
                self.no_face_clips += 1
                self.no_face_ids.append(clip_id)
            if r.decode_errors:
                self.decode_error_ids.append(clip_id)
            if r.audio_padded:
                self.padded_audio_ids.append(clip_id)

    def to_text(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.split_counts.items() if v)
        kept = f" to model.text_len ({self.text_len}) tokens" if self.text_len else ""
        lines = [
            f"clips: {self.total} found, {self.done} done ({self.extracted} extracted, "
            f"{self.cached} from cache), {self.failed} failed",
            f"splits: {splits or 'none'}",
            f"no-face frames: {100 * self.no_face_fraction:.1f}% ({self.no_face_clips} clips "
            f"without any face{_named(self.no_face_ids)})",
            f"transcripts: {self.asr_clips} by speech recognition, {self.truncated_texts} truncated"
            f"{kept if self.truncated_ids else ''}{_named(self.truncated_ids)}",
            f"pooled to max length: {self.pooled_audio} audio, {self.pooled_vision} vision",
        ]
        if self.decode_error_ids:
            lines.append(f"kept despite decode errors: {len(self.decode_error_ids)}{_named(self.decode_error_ids)}")
        if self.padded_audio_ids:
            lines.append(f"short audio padded with silence: {len(self.padded_audio_ids)}"
                         f"{_named(self.padded_audio_ids)}")
        lines.append(f"time: {self.total_seconds:.1f} s ({self.extract_seconds:.1f} s after loading the models), "
                     f"{self.clip_seconds:.1f} clip-seconds extracted ({self.speed:.1f}x real time)")
        if self.failed:
            lines.append(f"failures listed in {self.failures_path}")
        return "\n".join(lines)


def _named(ids: Sequence[str]) -> str:
    """``": a, b, c and 4 more"`` (empty when there are none)."""
    if not ids:
        return ""
    more = len(ids) - NAMED_CLIPS
    return ": " + ", ".join(ids[:NAMED_CLIPS]) + (f" and {more} more" if more > 0 else "")
