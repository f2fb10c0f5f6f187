"""Configuration: typed dataclasses and strict YAML loading.

A config has three sections: ``model`` (ALMT sizes and the text model), ``train`` (optimisation
and model selection) and ``extract`` (how features are made from raw clips). Loading is strict:
an unknown or misspelt key is an error naming it, and values are type-checked. Configs are never
mutated while running; values that depend on data (e.g. the text model's hidden size) are
resolved next to the config, not written back into it.

Built-in configs live in ``configs/`` (installed as ``almt_pipeline.configs``): ``default``
(small, CPU-friendly, embedded MiniLM text model), ``mosi``, ``mosei`` and ``sims`` (the released
ALMT hyperparameters).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .utils import first_line as _first_line

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BUILTIN_CONFIGS = ("default", "pyfeat", "mosi", "mosei", "sims")


@dataclass
class ModelConfig:
    """ALMT sizes. Input widths and max lengths must match the feature file."""

    text_model: str = DEFAULT_TEXT_MODEL  # Hugging Face hub name or local path (BERT architecture)
    text_len: int = 50  # L: tokens per sample
    audio_dim: int = 33  # d_a
    audio_len: int = 250  # T_a max
    vision_dim: int = 160  # d_v (landmarks backend)
    vision_len: int = 60  # T_v max
    dim: int = 128  # D: model width
    n_tokens: int = 8  # T: summary tokens per modality
    # modality embedding (one pre-norm transformer per modality)
    embed_depth: int = 1
    embed_heads: int = 8
    embed_dim_head: int = 64
    embed_mlp_dim: int = 128
    # adaptive hyper-modality learning; the language-scale transformer has ahl_depth - 1 blocks
    ahl_depth: int = 3
    ahl_heads: int = 8
    ahl_dim_head: int = 16
    lang_heads: int = 8
    lang_dim_head: int = 64
    lang_mlp_dim: int = 128
    # cross-modality fusion
    fusion_depth: int = 2
    fusion_heads: int = 8
    fusion_dim_head: int = 64
    fusion_mlp_dim: int = 128
    dropout: float = 0.0
    masked: bool = False  # key-padding masks from lengths (released code: False)


@dataclass
class TrainConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 200
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of epochs, then cosine
    seed: int = 7
    seeds: list[int] | None = None  # several seeds -> mean +- std
    select_metric: str = "MAE"  # validation metric that selects the checkpoint
    patience: int | None = None  # early stopping (epochs without improvement); None = off
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    grad_clip: float | None = None
    eval_batch_size: int = 128
    label_scale: str = "auto"  # auto | mosi ([-3, 3]) | sims ([-1, 1])


@dataclass
class AudioConfig:
    sample_rate: int = 22050
    hop_length: int = 512
    n_fft: int = 2048
    features: list[str] = field(default_factory=lambda: ["zcr", "mfcc", "chroma_cqt"])
    n_mfcc: int = 20
    n_chroma: int = 12


@dataclass
class VisualConfig:
    backend: str = "landmarks"  # landmarks (dlib, offline) | pyfeat
    fps: float = 10.0  # frames sampled per second of video
    max_side: int = 320  # frames are downscaled so the longer side is at most this
    detect_every: int = 5  # landmarks backend: run the face detector every N sampled frames
    pyfeat_landmarks: bool = False  # pyfeat backend: also output the 68 landmarks
    pyfeat_device: str = "auto"


@dataclass
class ExtractConfig:
    asr_model: str = "tiny.en"  # faster-whisper model name or path
    language: str | None = "en"
    audio: AudioConfig = field(default_factory=AudioConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    min_duration: float = 0.5  # seconds; a shorter clip is reported as bad


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)


_CHOICES = {
    ("train", "amp"): ("none", "bf16", "fp16"),
    ("train", "label_scale"): ("auto", "mosi", "sims"),
    ("extract", "visual", "backend"): ("landmarks", "pyfeat"),
}


def load_config(name_or_path: str | Path) -> Config:
    """Load a built-in config by name (``default``, ``mosi``, ``mosei``, ``sims``) or a YAML file."""
    text, source = _read_config_text(name_or_path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({_first_line(e)})") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, source=source)


def _read_config_text(name_or_path: str | Path) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: config file not found") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
    name = str(name_or_path)
    if name in BUILTIN_CONFIGS:
        return builtin_config_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8"), (
            f"{name}.yaml (built-in)"
        )
    raise ConfigError(
        f"{name}: no such config file or built-in config (built-ins: {', '.join(BUILTIN_CONFIGS)})"
    )


def builtin_config_dir() -> Any:
    """The folder of built-in configs: installed package data, or ``configs/`` in a source tree."""
    try:
        return resources.files("almt_pipeline.configs")
    except ModuleNotFoundError:  # running from a source checkout that shadows the installed package
        return Path(__file__).resolve().parent.parent / "configs"


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from a plain dict, rejecting unknown keys and wrong types."""
    cfg = _build(Config, raw, source, ())
    _check(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def replace_config(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with ``section={key: value}`` overrides applied (strictly).

    ``None`` values are ignored, so CLI options that were not given change nothing.
    """
    d = config_to_dict(cfg)
    for section, overrides in sections.items():
        if section not in d:
            raise ConfigError(f"unknown config section {section!r}")
        for key, value in overrides.items():
            if value is None:
                continue
            target = d[section]
            parts = key.split(".")
            for p in parts[:-1]:
                target = target[p]
            target[parts[-1]] = value
    return config_from_dict(d, source="config with command-line overrides")


def _build(cls: type, raw: Any, source: str, where: tuple[str, ...]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{'.'.join(where)}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        path = ".".join((*where, str(unknown[0])))
        close = _closest(str(unknown[0]), list(fields))
        hint = f" (did you mean '{close}'?)" if close else f" (known: {', '.join(fields)})"
        raise ConfigError(f"{source}: unknown config key '{path}'{hint}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, source, (*where, name))
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, where: tuple[str, ...]) -> Any:
    key = ".".join(where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, source, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, source, where) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _check(cfg: Config, source: str) -> None:
    for path, allowed in _CHOICES.items():
        value: Any = cfg
        for p in path:
            value = getattr(value, p)
        if value not in allowed:
            raise ConfigError(
                f"{source}: '{'.'.join(path)}' must be one of {', '.join(allowed)}, got {value!r}"
            )
    m, t = cfg.model, cfg.train
    positive = {
        "model.text_len": m.text_len, "model.audio_dim": m.audio_dim, "model.audio_len": m.audio_len,
        "model.vision_dim": m.vision_dim, "model.vision_len": m.vision_len, "model.dim": m.dim,
        "model.n_tokens": m.n_tokens, "model.ahl_depth": m.ahl_depth,
        "train.batch_size": t.batch_size, "train.epochs": t.epochs,
        "train.eval_batch_size": t.eval_batch_size,
        "extract.visual.fps": cfg.extract.visual.fps, "extract.visual.max_side": cfg.extract.visual.max_side,
        "extract.visual.detect_every": cfg.extract.visual.detect_every,
        "extract.audio.sample_rate": cfg.extract.audio.sample_rate,
        "extract.audio.hop_length": cfg.extract.audio.hop_length,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: '{key}' must be positive, got {value}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"{source}: 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if t.patience is not None and t.patience < 1:
        raise ConfigError(f"{source}: 'train.patience' must be at least 1 (or null), got {t.patience}")
    if t.seeds is not None and len(t.seeds) == 0:
        raise ConfigError(f"{source}: 'train.seeds' must list at least one seed (or be null)")


def _closest(word: str, candidates: list[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None
