"""Self-contained checkpoints: one directory that rebuilds a trained ALMT offline.

Layout::

    CHECKPOINT/
      config.json        format version, full Config, text_dim, label_scale, feature schema,
                         package version, training info (epoch, metrics, seed ...)
      model.safetensors  every weight, text encoder included (safetensors: no code on load)
      text_model/        the text model's BERT config.json and tokenizer files

Loading needs nothing but this directory and no network: the text encoder is rebuilt from
``text_model/config.json`` with random weights, then all weights come from ``model.safetensors``.

A checkpoint may come from anyone, so loading checks before it builds: every stored size must lie
within its declared bound (``config.py``, ``text_encoder.BERT_SIZE_BOUNDS``), and the parameter
count the two configs imply (:func:`~.almt.almt_parameter_count` + ``bert_parameter_count``) must fit in
``model.safetensors`` (float32). A config that asks for more than its weights file holds is
refused in one line instead of allocating until the process dies.

Writes are atomic: the directory is built under a temporary name next to the target and then
renamed into place, so a kill at any moment leaves the previous complete checkpoint (or, between
the two renames, a complete copy that the next save or load puts back).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Config, ModelConfig, config_from_dict, config_to_dict
from ..errors import AlmtError, CheckpointError
from ..files import atomic_write_json, current_umask
from ..metrics import SCALES
from ..utils import one_line, package_version
from .almt import ALMT, almt_parameter_count
from .heads import head_spec
from .text_encoder import bert_config_from_dict, bert_parameter_count, text_model_from_config

if TYPE_CHECKING:
    from transformers import BertConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FORMAT_NAME = "almt-pipeline-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_MODEL_DIR = "text_model"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
_MIN_VOCAB = 100  # fewer tokens means the vocabulary files were not found
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
_MAX_TOKENIZER_BYTES = 64 << 20  # bert-base-uncased: tokenizer.json 0.7 MB, vocab.txt 0.2 MB
MAX_JSON_BYTES = 16 << 20  # the JSON files of a checkpoint are kilobytes
_PARAM_BYTES = 4  # save_checkpoint writes float32 parameters
_SIZE_SLACK = 1.01  # estimated parameters may exceed what the weights file holds by 1% at most


@dataclass
class LoadedCheckpoint:
    """A checkpoint rebuilt in memory; ``model`` is in eval mode on the requested device."""

    model: torch.nn.Module
    cfg: Config
    tokenizer: PreTrainedTokenizerBase
    feature_meta: dict[str, Any]
    label_scale: str
    info: dict[str, Any] = field(default_factory=dict)  # text_dim, package version, epoch, metrics ...
    path: Path | None = None


def save_checkpoint(
    dir: str | os.PathLike[str],
    model: torch.nn.Module,
    cfg: Config,
    *,
    tokenizer: PreTrainedTokenizerBase,
    text_config: dict[str, Any],
    feature_meta: dict[str, Any],
    label_scale: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (ALMT incl. its text encoder) and everything needed to rebuild it to ``dir``.

    ``text_config`` is the text model's BERT config as a dict (``bert.config.to_dict()``);
    ``extra`` holds training information (epoch, metrics, seed ...) stored under ``info``.
    """
    dst = Path(dir)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dst)
    if "hidden_size" not in text_config:
        raise CheckpointError(f"{dst}: text model config has no 'hidden_size'")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{_TMP_TAG}", dir=dst.parent))
    try:
        text_dir = tmp / TEXT_MODEL_DIR
        text_dir.mkdir()
        atomic_write_json(text_dir / "config.json", text_config)
        try:
            tokenizer.save_pretrained(str(text_dir))
        except Exception as e:  # tokenizer libraries raise many types
            raise CheckpointError(f"{text_dir}: cannot save the tokenizer ({one_line(e)})") from e
        weights = tmp / WEIGHTS_FILE
        _save_weights(model, weights)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "package_version": package_version(),
            "config": _stored_config(cfg),
            "text_dim": int(text_config["hidden_size"]),
            "text_model_source": cfg.model.text_model,
            "label_scale": label_scale,
            "feature_meta": feature_meta or {},
            "info": extra or {},
        }
        # config.json is written last: a temporary directory holding it is complete.
        atomic_write_json(tmp / CONFIG_FILE, meta)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug("checkpoint written to %s", dst)


def _stored_config(cfg: Config) -> dict[str, Any]:
    """The config as stored: with the released objective, without the auxiliary objectives'
    sections (defaults when read back), so that earlier versions of this package load it too."""
    d = config_to_dict(cfg)
    if cfg.train.objective == "regression":
        for key in ("objective", "multitask", "contrastive"):
            d["train"].pop(key, None)
    return d


def load_checkpoint(dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model, config and tokenizer stored in ``dir`` (offline, nothing else needed).

    Nothing is built before the stored sizes are checked: each within its bound, and together no
    more parameters than ``model.safetensors`` holds.
    """
    path = Path(dir)
    if not path.exists():
        recover_dir(path, cleanup=False)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    meta = read_checkpoint_config(path)
    config_file = path / CONFIG_FILE
    try:
        cfg = config_from_dict(meta["config"], source=str(config_file))
    except AlmtError as e:  # its message names config_file
        raise CheckpointError(one_line(e)) from e
    bert_config, text_dim = _stored_text_config(path, meta, cfg.model)
    weights = path / WEIGHTS_FILE
    heads = head_spec(cfg.train)
    check_weights_size(weights, almt_parameter_count(cfg.model, text_dim, heads) + bert_parameter_count(bert_config))
    try:
        model = ALMT(cfg.model, text_model_from_config(bert_config), text_dim, heads)
    except Exception as e:  # noqa: BLE001 - torch and transformers raise many types
        raise CheckpointError(f"{config_file}: cannot build the model from the stored configs "
                              f"({one_line(e)})") from e
    _load_weights(model, weights)
    model.to(device).eval()
    tokenizer = _load_tokenizer(path / TEXT_MODEL_DIR)
    info = dict(_json_object(meta, "info", config_file))
    info.update(
        format_version=meta["format_version"],
        package_version=meta.get("package_version"),
        text_dim=text_dim,
        text_model_source=meta.get("text_model_source", cfg.model.text_model),
    )
    return LoadedCheckpoint(
        model=model,
        cfg=cfg,
        tokenizer=tokenizer,
        feature_meta=_stored_feature_meta(meta, config_file),
        label_scale=_stored_label_scale(meta, config_file),
        info=info,
        path=path,
    )


def _stored_text_config(path: Path, meta: dict[str, Any], m: ModelConfig) -> tuple[BertConfig, int]:
    """The text model's checked BertConfig and the text width ALMT is built for."""
    text_config_file = path / TEXT_MODEL_DIR / "config.json"
    try:
        bert_config = bert_config_from_dict(_read_json(text_config_file), source=str(text_config_file))
    except AlmtError as e:
        raise CheckpointError(str(e)) from e
    text_dim = meta.get("text_dim", bert_config.hidden_size)
    if text_dim != bert_config.hidden_size or isinstance(text_dim, bool):
        raise CheckpointError(
            f"{path / CONFIG_FILE}: 'text_dim' {text_dim!r} differs from the text model's hidden_size "
            f"{bert_config.hidden_size} ({text_config_file})"
        )
    if m.text_len > bert_config.max_position_embeddings:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: 'model.text_len' {m.text_len} exceeds the text model's "
            f"max_position_embeddings {bert_config.max_position_embeddings} ({text_config_file})"
        )
    return bert_config, int(text_dim)


def _json_object(meta: dict[str, Any], key: str, config_file: Path) -> dict[str, Any]:
    """``meta[key]``: a JSON object, or empty when absent or null."""
    value = meta.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{config_file}: '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _stored_feature_meta(meta: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """The feature meta, with ``feature_names`` (when present) a mapping of name lists."""
    feature_meta = dict(_json_object(meta, "feature_meta", config_file))
    names = feature_meta.get("feature_names")
    if names is not None and not (
        isinstance(names, dict)
        and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in names.values())
    ):
        raise CheckpointError(f"{config_file}: 'feature_meta.feature_names' must map modalities to "
                              "lists of feature names")
    return feature_meta


def _stored_label_scale(meta: dict[str, Any], config_file: Path) -> str:
    scale = meta.get("label_scale") or "mosi"
    if scale not in SCALES:
        raise CheckpointError(f"{config_file}: 'label_scale' must be one of {', '.join(SCALES)}, "
                              f"got {scale!r}")
    return str(scale)


def check_weights_size(path: Path, n_parameters: int) -> None:
    """Refuse, before anything is built, a config that asks for more parameters than the float32
    weights file ``path`` holds (its size less the safetensors header)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header = int.from_bytes(head[:8], "little")
    if len(head) < 9 or header < 2 or header > size - 8 or head[8:9] != b"{":
        raise CheckpointError(f"{path}: corrupt or unreadable weights (not a safetensors file: "
                              f"{size} bytes, header of {header} bytes)")
    holds = (size - 8 - header) // _PARAM_BYTES
    if n_parameters > holds * _SIZE_SLACK:
        raise CheckpointError(
            f"{path}: the stored configs describe a model of {n_parameters:,} parameters but the "
            f"weights file holds at most {holds:,}; refusing to build it"
        )


def read_checkpoint_config(dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict, after checking format and version."""
    config_file = Path(dir) / CONFIG_FILE
    meta = _read_json(config_file)
    if meta.get("format") != FORMAT_NAME or "config" not in meta:
        raise CheckpointError(f"{config_file}: not an almt-pipeline checkpoint config")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_file}: checkpoint format version {version!r} is newer than this package "
            f"supports ({FORMAT_VERSION}); upgrade almt-pipeline"
        )
    return meta


def copy_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a checkpoint directory to ``dst`` atomically (copy to a temporary dir, then rename)."""
    src, dst = Path(src), Path(dst)
    recover_dir(src)
    if not (src / CONFIG_FILE).is_file():
        raise CheckpointError(f"{src}: not a checkpoint directory (no {CONFIG_FILE})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{_TMP_TAG}", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, dst: Path) -> None:
    """Put the complete directory ``tmp`` at ``dst``, replacing any previous ``dst``.

    POSIX cannot rename over a non-empty directory, so the old one is first moved aside, then
    ``tmp`` is renamed into place and the old one deleted. ``recover_dir`` repairs a kill between
    the two renames.
    """
    for f in tmp.rglob("*"):  # contents on disk before the rename makes them visible
        if f.is_file():
            _fsync_file(f)
    _usual_permissions(tmp)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}{_OLD_TAG}", dir=dst.parent))
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path, cleanup: bool = True) -> None:
    """Finish or undo an interrupted ``replace_dir`` of ``dst``; remove leftovers if ``cleanup``.

    Only writers clean up: a reader must not delete the temporary directory of a running save.
    """
    dst = Path(dst)
    parent = dst.parent
    if not parent.is_dir():
        return
    temps = sorted(parent.glob(f".{dst.name}{_TMP_TAG}*"), key=lambda p: p.stat().st_mtime)
    olds = sorted(parent.glob(f".{dst.name}{_OLD_TAG}*"), key=lambda p: p.stat().st_mtime)
    if not dst.exists():
        complete = [t for t in temps if (t / CONFIG_FILE).is_file() and (t / WEIGHTS_FILE).is_file()]
        source = complete[-1] if complete else (olds[-1] if olds else None)
        if source is not None:
            logger.warning("restoring %s from interrupted write %s", dst, source.name)
            os.replace(source, dst)
    for leftover in (*temps, *olds):
        if cleanup and leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


def _usual_permissions(root: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give a checkpoint the usual ones."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    try:
        save_model(model, str(path), metadata={"format": FORMAT_NAME})
    except Exception as e:
        raise CheckpointError(f"{path}: cannot write weights ({one_line(e)})") from e


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    _check_weight_dtypes(path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as e:  # load_state_dict: tensor shapes differ from the built model
        raise CheckpointError(f"{path}: weights do not match the stored config ({one_line(e)})") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable weights ({one_line(e)})") from e
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
        raise CheckpointError(f"{path}: weights do not match the stored config: {'; '.join(parts)}")


def _check_weight_dtypes(path: Path) -> None:
    """Checkpoints hold float32 tensors: an integer, bool or 8-bit tensor would be cast silently."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                dtype = f.get_slice(key).get_dtype()
                if dtype != "F32":
                    raise CheckpointError(f"{path}: tensor {key!r} is {dtype}; checkpoints hold float32 (F32)")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable weights ({one_line(e)})") from e


def _load_tokenizer(text_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not text_dir.is_dir():
        raise CheckpointError(f"{text_dir}: text model directory missing")
    # transformers builds an empty tokenizer from a bare config.json: require the vocabulary
    if not any((text_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{text_dir}: cannot load the tokenizer (none of {', '.join(_TOKENIZER_FILES)} present)"
        )
    for name in os.listdir(text_dir):  # the tokenizer reads these whole into memory
        file = text_dir / name
        if not file.is_file() or file.stat().st_size > _MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{file}: not a regular file of at most {_MAX_TOKENIZER_BYTES >> 20} MiB "
                                  "(tokenizer files are small)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ...
        raise CheckpointError(f"{text_dir}: cannot load the tokenizer ({one_line(e)})") from e
    if len(tokenizer) < _MIN_VOCAB:
        raise CheckpointError(f"{text_dir}: cannot load the tokenizer (only {len(tokenizer)} tokens)")
    return tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    if path.exists() and not path.is_file():  # a FIFO would block the read
        raise CheckpointError(f"{path}: not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_JSON_BYTES + 1)
            if len(text) > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB, not a checkpoint file")
            obj = json.loads(text)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file missing from checkpoint") from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, huge ints
        raise CheckpointError(f"{path}: corrupt JSON ({one_line(e)})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
