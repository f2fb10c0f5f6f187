"""Text features: BERT token ids (``text_bert``) and the text model's hidden states (``text``).

Layout follows the MMSA feature files: ``text_bert`` is (3, L) = token ids, attention mask,
segment ids for ``[CLS] tokens [SEP]`` followed by zero padding; ``text`` is the model's last
hidden state for that whole padded sequence (the official pickles keep the outputs at padding
positions too, so this does the same). A feature file has one such row per clip, so a longer
transcript is cut to L tokens there (``TextFeatures.truncated``); prediction instead scores a
long transcript in consecutive windows of at most L tokens (:meth:`TextFeaturizer.windows`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ExtractionError
from ..model.text_encoder import load_text_model
from ..utils import one_line, resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


@dataclass
class TextFeatures:
    text_bert: np.ndarray  # (3, L) float32: ids, attention mask, segment ids
    hidden: np.ndarray  # (L, H) float32 last hidden state
    n_tokens: int  # tokens of the whole text incl. [CLS]/[SEP], before truncation
    truncated: bool  # n_tokens > L: the end of the text was cut


@dataclass
class TextWindow:
    """A stretch of a transcript as its own ``[CLS] tokens [SEP]`` sequence (zero padded to L)."""

    text_bert: np.ndarray  # (3, L) float32: ids, attention mask, segment ids
    tokens: int  # the transcript's tokens in it (without [CLS] and [SEP]), at most L - 2
    start: float  # where it starts and ends in the transcript, as fractions of its words
    end: float


def split_words(word_tokens: Sequence[Sequence[int]], size: int) -> list[tuple[list[int], float, float]]:
    """Pack the token ids of consecutive words into windows of at most ``size`` tokens, cutting
    only between words (a single word longer than ``size`` is cut between its tokens).

    Returns (token ids, start, end) per window, start and end counted in words: a word cut into
    pieces counts in proportion to each piece's tokens. The windows cover all words in order.
    """
    if size < 1:
        raise ValueError(f"a window holds at least one token, got {size}")
    pieces: list[tuple[list[int], float]] = []  # (ids, word position where the piece ends)
    for w, ids in enumerate(word_tokens):
        n = len(ids)
        if n <= size:
            pieces.append((list(ids), w + 1.0))
            continue
        for k in range(0, n, size):
            pieces.append((list(ids[k:k + size]), w + min(k + size, n) / n))
    windows: list[tuple[list[int], float, float]] = []
    current: list[int] = []
    start = end = 0.0
    for ids, piece_end in pieces:
        if current and len(current) + len(ids) > size:
            windows.append((current, start, end))
            current, start = [], end
        current += ids
        end = piece_end
    windows.append((current, start, float(len(word_tokens))))
    return windows


class TextFeaturizer:
    """Tokenize a transcript with the text model's BERT tokenizer and run the model.

    ``text_model`` is a hub name, a local folder or an embedded name (see
    ``model.text_encoder.resolve_text_model``). ``model``/``tokenizer`` may be given directly
    (already loaded), in which case ``text_model`` is only recorded. With ``tokenizer`` alone
    (no model) only ``text_bert`` is computed and ``hidden`` is (L, 0): prediction needs just the
    token ids, since the checkpoint runs its own fine-tuned text model.
    """

    def __init__(
        self,
        text_model: str,
        text_len: int,
        device: str = "cpu",
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        import torch

        if text_len < 2:
            raise ValueError(f"text_len must be >= 2 ([CLS] and [SEP]), got {text_len}")
        if tokenizer is None:
            if model is not None:
                raise ValueError("a model needs its tokenizer")
            model, tokenizer = load_text_model(text_model)
        self.text_model = text_model
        self.text_len = int(text_len)
        self.device = resolve_device(device)
        self.tokenizer = tokenizer
        # transformers types PreTrainedModel.to through functools.wraps, which loses the bound self
        self.model = model.to(self.device).eval() if model is not None else None  # type: ignore[arg-type]
        self.hidden_size = int(model.config.hidden_size) if model is not None else 0
        self._torch = torch

    def _encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """-> text_bert (B, 3, L) float32 and the untruncated token counts."""
        texts = [(t or "").strip() for t in texts]
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        n_tokens = [len(ids) for ids in full]
        enc = self.tokenizer(
            texts,
            max_length=self.text_len,
            truncation=True,
            padding="max_length",
            return_attention_mask=True,
            return_token_type_ids=True,
            return_tensors="np",
        )
        text_bert = np.stack(
            [enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]], axis=1
        ).astype(np.float32)  # (B, 3, L)
        return text_bert, n_tokens

    def _hidden(self, text_bert: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self.model is None:  # tokenizer only
            return np.zeros((*text_bert[:, 0].shape, 0), np.float32)  # (B, L, 0)
        tb = torch.from_numpy(text_bert).long().to(self.device)  # (B, 3, L)
        with torch.inference_mode():
            out = self.model(input_ids=tb[:, 0], attention_mask=tb[:, 1], token_type_ids=tb[:, 2])
        return out.last_hidden_state.float().cpu().numpy().astype(np.float32, copy=False)  # (B, L, H)

    def featurize_many(
        self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[TextFeatures]:
        """Featurize several texts, ``batch_size`` per model call (same result as one by one)."""
        results: list[TextFeatures] = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            try:
                text_bert, n_tokens = self._encode(chunk)
                hidden = self._hidden(text_bert)  # (B, L, H)
            except Exception as e:  # tokenizer / model failure on odd input
                raise ExtractionError(f"text model {self.text_model!r} failed: {one_line(e)}") from e
            for i, n in enumerate(n_tokens):
                results.append(TextFeatures(text_bert[i], hidden[i], n, n > self.text_len))
        return results

    def __call__(self, text: str) -> TextFeatures:
        return self.featurize_many([text])[0]

    def windows(self, text: str) -> list[TextWindow]:
        """``text`` as consecutive windows of at most ``text_len`` tokens each (``[CLS]`` + up to
        L - 2 of its tokens + ``[SEP]``), cut between whitespace-separated words (see
        :func:`split_words`). A text that fits gives one window equal to ``text_bert``.

        BERT tokenizers split on whitespace before anything else, so the words' tokens in a row
        are exactly the whole text's tokens.
        """
        words = (text or "").split()
        if not words:
            return [TextWindow(self._sequence([]), 0, 0.0, 1.0)]
        try:
            word_tokens = self.tokenizer(words, add_special_tokens=False, verbose=False)["input_ids"]
        except Exception as e:  # tokenizer failure on odd input
            raise ExtractionError(f"text model {self.text_model!r} failed: {one_line(e)}") from e
        total = len(words)
        return [TextWindow(self._sequence(ids), len(ids), start / total, end / total)
                for ids, start, end in split_words(word_tokens, self.text_len - 2)]

    def _sequence(self, ids: Sequence[int]) -> np.ndarray:
        """``[CLS] ids [SEP]`` -> (3, L) float32: ids, attention mask, segment ids, zero padded."""
        tok = self.tokenizer
        row = [tok.cls_token_id, *ids, tok.sep_token_id]
        out = np.zeros((3, self.text_len), np.float32)  # (3, L)
        out[0] = tok.pad_token_id or 0
        out[0, :len(row)] = row
        out[1, :len(row)] = 1.0
        return out
