"""Configuration: typed dataclasses and strict YAML loading.

A config has three sections: ``model`` (ALMT sizes and the text model), ``train`` (optimisation
and model selection) and ``extract`` (how features are made from raw clips). Loading is strict:
an unknown or misspelt key is an error naming it, and values are type-checked. Each numeric
field's range (``_size``: from 1 to a declared maximum; ``_bounded``: a :class:`Bound`) and each
string field's choices (``_choice``) are declared on the field itself and enforced by one loop
over the fields, so a bad value is one line naming the key, the rule and the value. Every size
has an upper bound: a config read from an untrusted checkpoint cannot ask for a model or a buffer
that would exhaust memory before anything checks it. Configs are never
mutated while running; values that depend on data (e.g. the text model's hidden size) are
resolved next to the config, not written back into it.

Built-in configs live in ``configs/`` (installed as ``almt_pipeline.configs``): ``default``
(small, CPU-friendly, embedded MiniLM text model), ``mosi``, ``mosei`` and ``sims`` (the released
ALMT hyperparameters), and recipes with an auxiliary training objective on top of those:
``mosi-contrastive`` and ``sims-multitask``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config_fields import (  # noqa: F401 (MAX_* are part of this module's interface)
    MAX_BATCH,
    MAX_DEPTH,
    MAX_EPOCHS,
    MAX_HEADS,
    MAX_LENGTH,
    MAX_SEED,
    MAX_WIDTH,
    _bounded,
    _choice,
    _size,
)
from .errors import ConfigError
from .metrics import SCALES
from .utils import one_line

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BUILTIN_CONFIGS = ("default", "pyfeat", "mosi", "mosei", "sims", "mosi-contrastive", "sims-multitask")
EXTRACTION_CONFIGS = ("default", "pyfeat")  # built-ins whose model widths match the extractors


@dataclass
class ModelConfig:
    """ALMT sizes. Input widths and max lengths must match the feature file."""

    text_model: str = DEFAULT_TEXT_MODEL  # Hugging Face hub name or local path (BERT architecture)
    text_len: int = _size(50, MAX_LENGTH)  # L: tokens per sample
    audio_dim: int = _size(33, MAX_WIDTH)  # d_a
    audio_len: int = _size(250, MAX_LENGTH)  # T_a max
    vision_dim: int = _size(160, MAX_WIDTH)  # d_v (landmarks backend)
    vision_len: int = _size(60, MAX_LENGTH)  # T_v max
    dim: int = _size(128, MAX_WIDTH)  # D: model width
    n_tokens: int = _size(8, MAX_LENGTH)  # T: summary tokens per modality
    # modality embedding (one pre-norm transformer per modality)
    embed_depth: int = _size(1, MAX_DEPTH)
    embed_heads: int = _size(8, MAX_HEADS)
    embed_dim_head: int = _size(64, MAX_WIDTH)
    embed_mlp_dim: int = _size(128, MAX_WIDTH)
    # adaptive hyper-modality learning; the language-scale transformer has ahl_depth - 1 blocks
    ahl_depth: int = _size(3, MAX_DEPTH)
    ahl_heads: int = _size(8, MAX_HEADS)
    ahl_dim_head: int = _size(16, MAX_WIDTH)
    lang_heads: int = _size(8, MAX_HEADS)
    lang_dim_head: int = _size(64, MAX_WIDTH)
    lang_mlp_dim: int = _size(128, MAX_WIDTH)
    # cross-modality fusion
    fusion_depth: int = _size(2, MAX_DEPTH)
    fusion_heads: int = _size(8, MAX_HEADS)
    fusion_dim_head: int = _size(64, MAX_WIDTH)
    fusion_mlp_dim: int = _size(128, MAX_WIDTH)
    dropout: float = _bounded(0.0, 0.0, 1.0)  # in [0, 1)
    masked: bool = False  # key-padding masks from lengths (released code: False)
    # attention computed by Attention.forward_fast (LayerNorm affines folded into Q/K/V, few-query
    # blocks projected on the query side) instead of the reference Attention.forward: the same
    # function and parameters, faster training. false: the plain reference path.
    fast_attention: bool = True
    # Ablations (the paper's Tables 3, 4 and 6; named variants in ablation.py). The defaults are the
    # released model; each switch removes one part:
    ahl: bool = True  # false: no AHL; the fusion source is the language, audio and vision summary tokens, concatenated
    fusion: bool = True  # false: no fusion transformer; a linear head on the pooled language + hyper-modality
    modality_embedding: bool = True  # false: each modality's T tokens are mean-pooled segments of its frames
    guided_layers: list[int] | None = None  # AHL layers (1-based) guided by language; the rest are MLPs. None: all
    drop_modalities: list[str] = field(default_factory=list)  # audio and/or vision: the model is built without it


DROPPABLE_MODALITIES = ("audio", "vision")  # text guides AHL and is the fusion target: it cannot be removed


def is_released_architecture(m: ModelConfig) -> bool:
    """True when no ablation switch of ``m`` is set (the paper's full model)."""
    return (m.ahl and m.fusion and m.modality_embedding and not m.drop_modalities
            and (m.guided_layers is None or sorted(m.guided_layers) == list(range(1, m.ahl_depth + 1))))


OBJECTIVES = ("regression", "multitask", "contrastive", "multitask+contrastive")


@dataclass
class MultitaskConfig:
    """``train.objective: multitask``: a score head per modality trained on unimodal labels (the
    SETGF recipe), with labels generated from the multimodal one where the data has none (the
    Self-MM rule; objectives.py documents it)."""

    weight: float = _bounded(1.0, 0.0)  # weight of each modality's loss next to the multimodal one
    # auto: the file's regression_labels_T/A/V where present, generated for the rest; given: the
    # file must have them; self: always generated (the file's unimodal labels are only evaluated)
    labels: str = _choice("auto", ("auto", "given", "self"))
    # generated labels start moving at this epoch; epoch 1 fills the memory the class centres need
    update_from_epoch: int = _bounded(2, 2, MAX_EPOCHS, high_open=False)


@dataclass
class ContrastiveConfig:
    """``train.objective: contrastive``: in-batch InfoNCE between the modalities' representations
    and, with ``balanced``, the final score as a learned mixture of every stage's prediction (the
    CMCBEP-CL recipe; objectives.py documents it)."""

    weight: float = _bounded(0.1, 0.0)  # weight of the InfoNCE loss
    temperature: float = _bounded(0.1, 0.0, 10.0, low_open=True, high_open=False)
    projection_dim: int = _size(64, MAX_WIDTH)  # width of the space where modalities are compared
    balanced: bool = True  # final score = softmax-weighted sum of the fused and unimodal predictions
    stage_weight: float = _bounded(0.5, 0.0)  # weight of each stage's own loss (balanced only)
    stage_lr_scale: float = _bounded(100.0, 0.0, low_open=True)  # the stage weights' lr: train.lr times this


@dataclass
class TrainConfig:
    lr: float = _bounded(1e-4, 0.0, low_open=True)
    weight_decay: float = _bounded(1e-4, 0.0)
    batch_size: int = _size(64, MAX_BATCH)
    epochs: int = _size(200, MAX_EPOCHS)
    warmup_ratio: float = _bounded(0.1, 0.0, 1.0)  # linear warm-up over this fraction of epochs, then cosine
    seed: int = _bounded(7, 0, MAX_SEED)
    seeds: list[int] | None = None  # several seeds -> mean +- std
    select_metric: str = "MAE"  # validation metric that selects the checkpoint
    patience: int | None = _size(None, MAX_EPOCHS)  # early stopping (epochs without improvement); None = off
    amp: str = _choice("none", ("none", "bf16", "fp16"))  # fp16 / bf16: CUDA only
    grad_clip: float | None = _bounded(None, 0.0)  # max gradient norm; None or 0 = off
    eval_batch_size: int = _size(128, MAX_BATCH)
    # auto (from the data) | mosi ([-3, 3]) | mosei (as mosi) | sims ([-1, 1])
    label_scale: str = _choice("auto", ("auto", *SCALES))
    # the loss: regression (the released MSE), or with auxiliary objectives (see the sections below)
    objective: str = _choice("regression", OBJECTIVES)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)


@dataclass
class AudioConfig:
    sample_rate: int = _size(22050, 384_000)  # Hz: the highest rate audio hardware records
    # samples per frame step and per FFT window: 2**16 is 3 s at 22050 Hz, far longer than a frame
    hop_length: int = _size(512, 65536)
    n_fft: int = _size(2048, 65536)
    features: list[str] = field(default_factory=lambda: ["zcr", "mfcc", "chroma_cqt"])
    n_mfcc: int = _size(20, 128)  # at most the 128 mel bands the MFCCs are computed from
    # pitch classes per octave (12 semitones; 24 quarter tones); the CQT uses 3 bins per class
    # and its longest filter grows with them, so finer classes cost memory for no use
    n_chroma: int = _size(12, 48)


@dataclass
class VisualConfig:
    backend: str = _choice("landmarks", ("landmarks", "pyfeat"))  # landmarks (dlib, offline) | pyfeat
    # frames sampled per second of video, at most 1000 (high-speed cameras): more only repeats frames
    fps: float = _bounded(10.0, 0.0, 1000.0, low_open=True, high_open=False)
    # frames are downscaled (never up) so the longer side is at most this; 16384 is beyond 16K video
    max_side: int = _size(320, 16384)
    # both backends: run the face detector every N sampled frames (a count of frames); in between
    # the face found last is tracked, with a re-detection whenever tracking fails
    detect_every: int = _size(5, MAX_LENGTH)
    pyfeat_landmarks: bool = False  # pyfeat backend: also output the 68 landmarks
    pyfeat_device: str = "auto"  # pyfeat backend: auto (CUDA when present), cpu, cuda or cuda:N
    # pyfeat backend: frames per batch through py-feat's models (larger: faster on a GPU, more memory)
    pyfeat_batch_size: int = _size(16, MAX_BATCH)
    # pyfeat backend: folder of py-feat's weights in Hugging Face cache layout, filled once with
    # `hf download py-feat/... --cache-dir DIR`; null: py-feat's package folder (downloads on first use)
    pyfeat_weights: str | None = None


@dataclass
class ExtractConfig:
    asr_model: str = "tiny.en"  # faster-whisper model name or path
    language: str | None = "en"
    audio: AudioConfig = field(default_factory=AudioConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    min_duration: float = _bounded(0.5, 0.0)  # seconds; a shorter clip is reported as bad


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)


def load_config(name_or_path: str | Path) -> Config:
    """Load a built-in config by name (``default``, ``mosi``, ``mosei``, ``sims``) or a YAML file."""
    text, source = _read_config_text(name_or_path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({one_line(e)})") from e
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
            raise ConfigError(f"{path}: cannot read config ({one_line(e)})") from e
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
        what = f"'{'.'.join(where)}'" if where else "the config"
        raise ConfigError(f"{source}: {what} must be a mapping, got {raw!r}")
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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


def check_model_config(m: ModelConfig, source: str = "model config") -> None:
    """The declared bounds of a ModelConfig built in code (loaded configs are checked on load)."""
    _check_fields(m, source, ("model",))
    _check_model_rules(m, source)


def _check_model_rules(m: ModelConfig, source: str) -> None:
    """Rules between model fields: the ablation switches."""
    for name in m.drop_modalities:
        if name not in DROPPABLE_MODALITIES:
            raise ConfigError(f"{source}: 'model.drop_modalities' may hold {' and '.join(DROPPABLE_MODALITIES)} "
                              f"(text guides the model and cannot be removed), got {name!r}")
    if len(set(m.drop_modalities)) != len(m.drop_modalities):
        raise ConfigError(f"{source}: 'model.drop_modalities' lists a modality twice: {m.drop_modalities}")
    if m.ahl and len(m.drop_modalities) == len(DROPPABLE_MODALITIES):
        raise ConfigError(f"{source}: with audio and vision dropped AHL has nothing to attend to; set model.ahl: "
                          "false for a language-only model")
    if m.guided_layers is not None:
        if not m.guided_layers:
            raise ConfigError(f"{source}: 'model.guided_layers' must list at least one AHL layer (no guidance at all: "
                              "model.ahl: false)")
        if len(set(m.guided_layers)) != len(m.guided_layers) or not all(
                1 <= j <= m.ahl_depth for j in m.guided_layers):
            raise ConfigError(f"{source}: 'model.guided_layers' must list distinct AHL layers from 1 to "
                              f"model.ahl_depth={m.ahl_depth}, got {m.guided_layers}")
        if not m.ahl:
            raise ConfigError(f"{source}: 'model.guided_layers' needs model.ahl: true (there is no AHL to guide)")


def _check(cfg: Config, source: str) -> None:
    """Enforce the ``bound`` and ``choices`` declared on the fields, then cross-field rules."""
    _check_fields(cfg, source, ())
    _check_model_rules(cfg.model, source)
    kept = 3 - len(cfg.model.drop_modalities)  # text, and audio and vision unless dropped
    if "contrastive" in cfg.train.objective and kept < 2:
        raise ConfigError(f"{source}: train.objective {cfg.train.objective} contrasts modalities with each other; "
                          "the model keeps only text (model.drop_modalities)")
    if cfg.train.seeds is not None and len(cfg.train.seeds) == 0:
        raise ConfigError(f"{source}: 'train.seeds' must list at least one seed (or be null)")
    for seed in cfg.train.seeds or ():
        if not 0 <= seed < MAX_SEED:
            raise ConfigError(f"{source}: 'train.seeds' must hold seeds in [0, {MAX_SEED}), got {seed}")


def _check_fields(obj: Any, source: str, where: tuple[str, ...]) -> None:
    """Walk the fields of the dataclass ``obj`` (and nested sections); one line per violation."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = (*where, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, source, path)
            continue
        key = ".".join(path)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
        bound = f.metadata.get("bound")
        if bound is None or value is None or bound.admits(value):
            continue
        need = bound.describe()
        if isinstance(value, float) and not math.isfinite(value) and bound.high is None:
            need = f"finite and {need}"
        or_null = " (or null)" if f.default is None else ""
        raise ConfigError(f"{source}: '{key}' must be {need}{or_null}, got {value!r}")


def parse_seed_list(text: str, what: str = "--seeds") -> list[int]:
    """Comma-separated integer seeds, e.g. ``1111,1112,1113`` (bounds are checked with the config)."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated integers, got {text!r}") from None


def _closest(word: str, candidates: list[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None
