"""Import weights of other ALMT implementations into this package's model.

Two source layouts are understood, by their state-dict key names:

- ``official``: the authors' released code (``models/almt.py``): ``h_hyper``, ``bertmodel.model.*``,
  ``proj_l/proj_a/proj_v``, ``l_encoder``, ``h_hyper_layer``, ``fusion_layer``,
  ``regression_layer.0``;
- ``mmsa``: MMSA's ALMT: the same modules with ``embedding_l/a/v`` and ``regression_head``,
  possibly under the ``Model.`` prefix of MMSA's model wrapper.

Conversion is strict: every source key must be used, every parameter of our model filled and
every shape equal; otherwise one error lists the problems.

A weights file is recognised by its first bytes before it is read: a ``torch.save`` zip archive
or pickle goes to ``torch.load(weights_only=True)`` (tensors and plain containers only: a pickle
that asks for any other callable is refused, not run), a safetensors file to safetensors; an
empty file, a text file or anything else is refused by name. A zip archive whose entries would
expand far beyond its size on disk is refused before torch allocates them.
"""

from __future__ import annotations

import dataclasses
import logging
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from ..config import Config, is_released_architecture
from ..errors import CheckpointError, ConfigError
from ..utils import one_line
from .almt import ALMT
from .checkpoint import save_checkpoint
from .text_encoder import load_text_model

log = logging.getLogger(__name__)

FORMATS = ("official", "mmsa")
_WRAPPER_PREFIXES = ("module.", "Model.")
# zip entries may expand to this multiple of the archive's size (torch.save stores them as they are)
_MAX_ZIP_EXPANSION = 2
_SNIFF_BYTES = 512
# persistent buffers of older transformers versions that newer ones no longer save
_OPTIONAL_TEXT_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

# one transformer block of the source (PreNormAttention + PreNormForward) -> our Block
_BLOCK_RULES = (
    (r"0\.norm_(?P<x>[qkv])\.(?P<p>weight|bias)", r"attn.norm_\g<x>.\g<p>"),
    (r"0\.fn\.to_(?P<x>[qkv])\.weight", r"attn.to_\g<x>.weight"),
    (r"0\.fn\.to_out\.0\.(?P<p>weight|bias)", r"attn.to_out.\g<p>"),
    (r"1\.norm\.(?P<p>weight|bias)", r"ff.norm.\g<p>"),
    (r"1\.fn\.net\.0\.(?P<p>weight|bias)", r"ff.fc1.\g<p>"),
    (r"1\.fn\.net\.3\.(?P<p>weight|bias)", r"ff.fc2.\g<p>"),
)
# one AHL layer of the source (PreNormAHL around HhyperLearningLayer) -> our AHLLayer
_AHL_RULES = (
    (r"norm1\.(?P<p>weight|bias)", r"norm_lang.\g<p>"),
    (r"norm2\.(?P<p>weight|bias)", r"norm_audio.\g<p>"),
    (r"norm3\.(?P<p>weight|bias)", r"norm_vision.\g<p>"),
    (r"norm4\.(?P<p>weight|bias)", r"norm_hyper.\g<p>"),
    (r"fn\.to_q\.weight", r"to_q.weight"),
    (r"fn\.to_k_ta\.weight", r"to_k_audio.weight"),
    (r"fn\.to_v_ta\.weight", r"to_v_audio.weight"),
    (r"fn\.to_k_tv\.weight", r"to_k_vision.weight"),
    (r"fn\.to_v_tv\.weight", r"to_v_vision.weight"),
    (r"fn\.to_out\.0\.(?P<p>weight|bias)", r"to_out.\g<p>"),
)


def _rules(fmt: str) -> list[tuple[re.Pattern[str], str]]:
    """(source pattern, target template) pairs for a source format."""
    embed = {"official": "proj_{m}", "mmsa": "embedding_{m}"}[fmt]
    head = {"official": r"regression_layer\.0", "mmsa": "regression_head"}[fmt]
    rules: list[tuple[str, str]] = [
        (r"h_hyper", "hyper"),
        (r"bertmodel\.model\.(?P<k>.+)", r"text_encoder.\g<k>"),
        (rf"{head}\.(?P<p>weight|bias)", r"head.\g<p>"),
        (r"l_encoder\.pos_embedding", "lang_pos"),
        (r"fusion_layer\.extra_token", "fusion_token"),
        (r"fusion_layer\.pos_embedding_s", "fusion_pos_src"),
        (r"fusion_layer\.pos_embedding_t", "fusion_pos_tgt"),
    ]
    stacks = [("l_encoder\\.encoder", "lang_blocks"), ("fusion_layer\\.CrossTransformerEncoder", "fusion_blocks")]
    for src, ours in (("l", "text"), ("a", "audio"), ("v", "vision")):
        prefix = embed.format(m=src)
        rules += [
            (rf"{prefix}\.0\.(?P<p>weight|bias)", rf"embed_{ours}.proj.\g<p>"),
            (rf"{prefix}\.1\.pos_embedding", f"embed_{ours}.pos"),
            (rf"{prefix}\.1\.extra_token", f"embed_{ours}.tokens"),
        ]
        stacks.append((rf"{prefix}\.1\.encoder", f"embed_{ours}.blocks"))
    for src_stack, our_stack in stacks:
        rules += [(rf"{src_stack}\.layers\.(?P<i>\d+)\.{s}", rf"{our_stack}.\g<i>.{t}") for s, t in _BLOCK_RULES]
    rules += [(rf"h_hyper_layer\.layers\.(?P<i>\d+)\.0\.{s}", rf"ahl.\g<i>.{t}") for s, t in _AHL_RULES]
    return [(re.compile(p), t) for p, t in rules]


def _strip_wrappers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _summary(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def convert_state_dict(sd: dict[str, Tensor], fmt: str, model: ALMT, source: str = "weights") -> dict[str, Tensor]:
    """Rename a source state dict (``fmt`` ``official`` or ``mmsa``) to ``model``'s keys, strictly.

    Raises CheckpointError listing unused source keys, missing target keys and shape mismatches.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"{source}: unknown weights format {fmt!r} (use {' or '.join(FORMATS)})")
    sd = _strip_wrappers(dict(sd))
    target = model.state_dict()
    rules = _rules(fmt)
    out: dict[str, Tensor] = {}
    unused, shapes, duplicates = [], [], []
    for key, value in sd.items():
        new = None
        for pattern, template in rules:
            m = pattern.fullmatch(key)
            if m:
                new = m.expand(template)
                break
        if new is None:
            unused.append(key)
            continue
        if new not in target:
            inner = new.removeprefix("text_encoder.")
            if new.startswith("text_encoder.") and inner in _OPTIONAL_TEXT_BUFFERS:
                continue  # buffer saved by older transformers versions; rebuilt by ours
            unused.append(key)
            continue
        if new in out:
            duplicates.append(key)
            continue
        if not isinstance(value, Tensor):
            shapes.append(f"{key} is not a tensor")
            continue
        if tuple(value.shape) != tuple(target[new].shape):
            shapes.append(f"{key} {tuple(value.shape)} vs {new} {tuple(target[new].shape)}")
            continue
        out[new] = value.to(target[new].dtype)
    missing = [k for k in target if k not in out]
    problems = []
    if shapes:
        problems.append(f"shape mismatch: {_summary(shapes)}")
    if missing:
        problems.append(f"missing from the {fmt} weights: {_summary(missing)}")
    if unused:
        problems.append(f"not used by the model: {_summary(unused)}")
    if duplicates:
        problems.append(f"duplicate keys: {_summary(duplicates)}")
    if problems:
        raise CheckpointError(
            f"{source}: does not match the model config as {fmt} ALMT weights; " + "; ".join(problems)
        )
    return out


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``)
    or ``.safetensors``; a dict wrapping it under ``state_dict`` or ``model`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    kind = _weights_kind(path)
    if kind == "zip":
        _check_zip_expansion(path)
    obj: object
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # the error below says all a user needs
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and safetensors errors alike
        raise CheckpointError(_unreadable(path, kind, e)) from e
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def _weights_kind(path: Path) -> str:
    """``zip``, ``pickle`` (both torch.save formats) or ``safetensors`` from the first bytes;
    anything else is refused here with what the file is."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    header = int.from_bytes(head[:8], "little")
    if path.suffix == ".safetensors" or (head[8:9] == b"{" and header <= path.stat().st_size - 8):
        return "safetensors"
    if head.startswith(b"\x80"):  # pickle protocol 2+: torch.save's legacy format
        return "pickle"
    if not head:
        raise CheckpointError(f"{path}: empty file, not a weights file")
    expected = "expected a torch.save file (.pt/.pth/.bin) or .safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        raise CheckpointError(f"{path}: a text file, not a weights file ({expected})")
    raise CheckpointError(
        f"{path}: not a weights file (starts with bytes {head[:4].hex()}: neither a zip archive "
        f"nor a pickle nor safetensors; {expected})"
    )


def _check_zip_expansion(path: Path) -> None:
    """Refuse a zip archive whose entries would expand far beyond its size (a zip bomb)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            expanded = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: a damaged zip archive, not a PyTorch checkpoint ({one_line(e)})") from e
    if expanded > _MAX_ZIP_EXPANSION * size + (1 << 20):
        raise CheckpointError(
            f"{path}: refused: its zip entries would expand to {expanded:,} bytes from {size:,} on disk "
            "(torch.save stores them uncompressed)"
        )


def _unreadable(path: Path, kind: str, e: Exception) -> str:
    """The one-line error for a file of ``kind`` that its reader refused."""
    text = " ".join(str(e).split())
    called = re.search(r"GLOBAL ([\w.]+)", text)
    if called:
        return (f"{path}: refused: the pickle asks to call {called.group(1)}, which could run code; "
                "weights files may hold only tensors and plain containers")
    detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    cause = detail.group(1) if detail else one_line(e)
    opcode = re.fullmatch(r"Unsupported operand (\d+)", cause)
    names = {op.code: op.name for op in pickletools.opcodes}
    if opcode and chr(int(opcode.group(1))) in names:
        cause = f"pickle instruction {names[chr(int(opcode.group(1)))]} is not allowed"
    if kind == "zip":
        return f"{path}: a zip archive but not a PyTorch checkpoint written by torch.save ({cause})"
    if kind == "pickle":
        return f"{path}: a pickle but not PyTorch weights that weights-only loading reads ({cause})"
    return f"{path}: not a valid safetensors file ({cause})"


def import_weights(path: str | Path, fmt: str, cfg: Config, text_model: str | None, out_dir: str | Path,
                   *, label_scale: str | None = None) -> ALMT:
    """Convert a released-code or MMSA ALMT state dict into a checkpoint directory ``out_dir``.

    ``cfg`` (a ``Config``) must describe the same model sizes as the source; ``text_model``
    (default: the config's) supplies the BERT architecture and tokenizer. Returns the model.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"{path}: unknown weights format {fmt!r} (use {' or '.join(FORMATS)})")
    if not is_released_architecture(cfg.model):
        raise ConfigError(f"{path}: released weights are the full model; the config sets an ablation switch "
                          "(model.ahl, fusion, modality_embedding, guided_layers or drop_modalities)")
    if cfg.train.objective != "regression":  # released weights have no heads of auxiliary objectives
        log.warning("%s: released weights are trained with the regression objective; the checkpoint records "
                    "train.objective regression instead of the config's %s", path, cfg.train.objective)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="regression"))
    sd = load_state_dict_file(path)
    if text_model:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_model=text_model))
    bert, tokenizer = load_text_model(cfg.model.text_model, pretrained=False)  # weights come from `path`
    model = ALMT(cfg.model, bert, bert.config.hidden_size)
    model.load_state_dict(convert_state_dict(sd, fmt, model, source=str(path)), strict=True)
    model.eval()
    scale = label_scale or cfg.train.label_scale
    if scale == "auto":
        scale = "mosi"
        log.warning("label scale not given and config says 'auto'; assuming MOSI labels [-3, 3]")
    m = cfg.model
    feature_meta = {
        "text_model": m.text_model,
        "label_scale": scale,
        "lengths": {"text": m.text_len, "audio": m.audio_len, "vision": m.vision_len},
    }
    save_checkpoint(
        out_dir, model, cfg, tokenizer=tokenizer, text_config=bert.config.to_dict(),
        feature_meta=feature_meta, label_scale=scale,
        extra={"imported_from": str(path), "import_format": fmt},
    )
    log.info("imported %s weights from %s into %s", fmt, path, out_dir)
    return model
