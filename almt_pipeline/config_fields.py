"""The machinery of typed config fields: size bounds and choices declared on each dataclass field.

``_size``, ``_bounded`` and ``_choice`` declare a field's range or choices in its metadata;
:mod:`.config` enforces them with one loop over the fields. The ``MAX_*`` constants bound every
size, so a config read from an untrusted checkpoint cannot ask for a model or buffer that exhausts
memory before anything checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Upper bounds of model sizes. Each is far above any ALMT or BERT in use, and low enough that no
# single number can make building the model allocate without limit; their product is checked
# against the weights file when a checkpoint is loaded (model/checkpoint.py).
MAX_DEPTH = 64  # blocks in one stack: the released models use 1 to 4, BERT-large 24
MAX_HEADS = 256  # attention heads: ALMT uses 8, the largest published transformers under 200
# widths (feature widths, model width, head width, MLP width): 2**16 is wider than any layer of a
# published transformer (GPT-3's MLP: 49152) or any face/acoustic feature set (OpenFace: 709)
MAX_WIDTH = 65536
# sequence lengths (tokens, frames, summary tokens): 100000 audio frames at 43 per second are 39
# minutes of speech, while the built-in configs pad to at most 500 frames
MAX_LENGTH = 100_000
# samples per batch: 64 times the released batch size, more than a whole split of MOSI (1284)
MAX_BATCH = 4096
MAX_EPOCHS = 100_000  # epochs (and early-stopping patience): the released runs train 200


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed


@dataclass(frozen=True)
class Bound:
    """The values a numeric config field admits: at least ``low`` (greater than ``low`` when
    ``low_open``) and, when ``high`` is set, below ``high`` (at most ``high`` unless ``high_open``).
    NaN and infinities are never admitted."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = True

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # ints: exact, however large
            return False
        above = value > self.low if self.low_open else value >= self.low
        if self.high is None or not above:
            return above
        return value < self.high if self.high_open else value <= self.high

    def describe(self) -> str:
        """E.g. ``at least 1``, ``greater than 0``, ``in [0, 1)``, ``in [1, 64]``."""
        if self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        return f"{'greater than' if self.low_open else 'at least'} {_number(self.low)}"


def _number(x: float) -> str:
    """``100000`` rather than ``1e+05``; ``0.5`` as is."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounded(default: Any, low: float, high: float | None = None, *, low_open: bool = False,
             high_open: bool = True) -> Any:
    """A field whose value (when not null) must lie within ``Bound(low, high, low_open, high_open)``."""
    return field(default=default, metadata={"bound": Bound(low, high, low_open, high_open)})


def _size(default: int | None, most: int) -> Any:
    """An integer field from 1 to ``most``: a length, width, count or depth."""
    return _bounded(default, 1, most, high_open=False)


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    """A string field that must be one of ``choices``."""
    return field(default=default, metadata={"choices": choices})


__all__ = [
    "MAX_DEPTH", "MAX_HEADS", "MAX_WIDTH", "MAX_LENGTH", "MAX_BATCH", "MAX_EPOCHS", "MAX_SEED", "Bound",
    "_bounded", "_size", "_choice",
]
