"""The pictures of ``almt explain``: AHL attention grids, before/after perturbation grids and the
summary tokens' attention over the inputs (see :mod:`.explain` for what the maps are)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_write

if TYPE_CHECKING:
    from .explain import Explanation

MAPS = (("audio", "α"), ("vision", "β"))  # AHL trace key, the paper's name of its map


def _figure(rows: int, cols: int, width: float, row_height: float) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure  # heavy: imported only when a picture is drawn

    fig = Figure(figsize=(width, 1.0 + row_height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Any, path: str | os.PathLike) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


Cell = tuple[str, "np.ndarray | None", str]  # panel title (or an empty panel's note), (T, T) map, key modality


def _grid(path: str | os.PathLike, title: str, rows: list[list[Cell]], bars: list[tuple[slice, str, str]]) -> None:
    """(T, T) AHL maps in a grid, rows = language queries, columns = key summary tokens; ``bars``:
    (columns, colour bar label, colour map) sharing one colour scale (differences: from 0)."""
    fig, axes = _figure(len(rows), len(rows[0]), 4.2 * len(rows[0]), 3.4)
    for cols, label, cmap in bars:
        maps = [m for row in rows for _, m, _ in row[cols] if m is not None]
        vmax = max((float(m.max()) for m in maps), default=0.0) or 1e-9
        vmin = 0.0 if "difference" in label else min((float(m.min()) for m in maps), default=0.0)
        im = None
        for r, row in enumerate(rows):
            for ax, (text, m, key) in zip(axes[r, cols], row[cols]):
                if m is None:
                    ax.axis("off")
                    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.35")
                    continue
                im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
                ax.set_xticks(range(m.shape[1]))
                ax.set_yticks(range(m.shape[0]))
                ax.set(xlabel=f"key: {key} summary token j", ylabel="query: language token i")
                ax.set_title(text, fontsize="medium")
        if im is not None:
            fig.colorbar(im, ax=axes[:, cols], shrink=0.8, label=label)
    fig.suptitle(title.replace("$", r"\$"))  # ids such as video$_$clip: no mathtext
    _save(fig, path)


def plot_attention(path: str | os.PathLike, ex: Explanation) -> None:
    """A grid of heatmaps: rows AHL layers, columns alpha (language -> audio) and beta (language -> vision)."""
    def cell(layer: dict[str, np.ndarray], j: int, key: str, greek: str) -> Cell:
        if key in layer:
            return f"layer {j}: {greek} (language → {key})", layer[key], key
        why = ("the model has no AHL layers\n(model.ahl: false)" if not ex.ahl else f"layer {j}: no {key}\n"
               "(model.drop_modalities)" if layer else f"layer {j} is not guided\nby language (model.guided_layers)")
        return why, None, key

    mean = "mean " if ex.n_samples > 1 else ""
    label = "" if ex.label is None else f", {mean}label {ex.label:+.3f}"
    rows = [[cell(layer, j, key, greek) for key, greek in MAPS] for j, layer in enumerate(ex.ahl or [{}], 1)]
    _grid(path, f"{ex.target}: {mean}score {ex.score:+.3f}{label}", rows,
          [(slice(0, 2), "attention weight (heads averaged; rows sum to 1)", "viridis")])


def plot_perturbation(path: str | os.PathLike, ex: Explanation) -> None:
    """Per AHL layer the perturbed modality's map before, after and |after - before|."""
    p = ex.perturbation
    assert p is not None
    key, greek = p["modality"], dict(MAPS)[p["modality"]]
    rows: list[list[Cell]] = [
        [(f"layer {j}: {greek} before", b[key], key), (f"layer {j}: {greek} after", a[key], key),
         (f"layer {j}: |{greek} after − before|", np.abs(a[key] - b[key]), key)]
        for j, (b, a) in enumerate(zip(ex.ahl, p["ahl"]), 1) if key in b and key in a
    ] or [[(f"no AHL layer attends to {key}", None, key)] * 3]
    when = " ({:.2f}-{:.2f} s)".format(*p["seconds"]) if p["seconds"] else ""
    other = [np.abs(a[k] - b[k]).max() for b, a in zip(ex.ahl, p["ahl"]) for k in a if k != key and k in b]
    _grid(path, f"{ex.target}: Gaussian noise on {key} frame {p['frame']}{when}, std {p['noise_std']:g} × feature "
          f"std, seed {p['seed']}\nscore {ex.score:+.4f} → {p['score']:+.4f} (change {p['score'] - ex.score:+.2g})"
          + (f"; largest change of {'β' if key == 'audio' else 'α'}: {max(other):.2g}" if other else ""), rows,
          [(slice(0, 2), "attention weight", "viridis"), (slice(2, 3), "|difference|", "magma")])


def plot_summary(path: str | os.PathLike, ex: Explanation) -> None:
    """Per modality, the summary tokens' attention over the real input positions, seconds on top where known."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(ex.summary), 1, 12.0, 2.9)
    for ax, (modality, rep) in zip(axes[:, 0], ex.summary.items()):
        w, sec = rep["weights"], rep["seconds"]  # (T, n), (n, 2) or None
        real, pad = (100 * np.mean([r[k] for r in rep["summary_tokens"]]) for k in ("to_inputs", "to_padding"))
        ax.set_title(f"{modality}: {rep['timing']}; mean share of attention on the real inputs {real:.0f}%, on padding "
                     f"{pad:.0f}%", loc="left", fontsize="medium")
        if not w.size:
            ax.axis("off")
            continue
        im = ax.imshow(w, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, pad=0.01, label="weight")
        ax.set_yticks(range(w.shape[0]))
        ax.set_ylabel("summary token")
        if modality == "text":
            ax.set_xticks(range(w.shape[1]), [t.replace("$", r"\$") for t in rep["labels"]], rotation=90,
                          fontsize="small")
        else:
            ax.set_xlabel(f"{modality} input position (frame index)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if sec is not None and len(sec) > 1:  # position -> seconds, linear (exact unless pooled)
            a, b = float(sec[0, 0]), float(sec[-1, 0] - sec[0, 0]) / (len(sec) - 1)
            top = ax.secondary_xaxis("top", functions=(lambda x, a=a, b=b: a + b * x, lambda t, a=a, b=b: (t - a) / b))
            top.set_xlabel("seconds from the clip's start", fontsize="small")
    fig.suptitle(f"{ex.target}: summary tokens' attention over the inputs (renormalised over real positions)"
                 .replace("$", r"\$"))
    _save(fig, path)
