"""``almt explain``: AHL attention maps of one clip or sample (the paper's Fig. 4 and Fig. 5).
:func:`register` adds the command to the main Typer app."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .cli_common import CheckpointOpt, DeviceOpt, EvalBatchOpt, QuietOpt, VerboseOpt, one_line_errors, setup_logging
from .errors import ConfigError
from .schema import SPLITS, check_split

if TYPE_CHECKING:
    from .explain import Explanation


@one_line_errors
def explain(
    clip_or_id: str | None = typer.Argument(
        None, metavar="CLIP_OR_ID",
        help="A media file (scored as `almt predict` does), or with --data a sample id; none with --average.",
    ),
    checkpoint: Path | None = CheckpointOpt,
    data: Path | None = typer.Option(
        None, "--data", "-d",
        help="MMSA-format feature pickle: CLIP_OR_ID is then the id of one of its samples.",
    ),
    split: str | None = typer.Option(
        None, "--split",
        help=f"With --data: the split to find the id in (default: all) or to average (default: test); "
             f"{', '.join(SPLITS)}.",
    ),
    average: bool = typer.Option(
        False, "--average",
        help="Average alpha and beta over every sample of the --split of --data (the paper's Fig. 4).",
    ),
    transcript: str | None = typer.Option(
        None, "--transcript",
        help="The clip's transcript (default: its sidecar .txt/.srt, else speech recognition).",
    ),
    perturb_frame: int | None = typer.Option(
        None, "--perturb-frame",
        help="Also explain with Gaussian noise on this real input frame (0-based) and write perturbation.png "
             "(the paper's Fig. 5).",
    ),
    perturb_modality: str = typer.Option(
        "vision", "--perturb-modality",
        help="The modality of --perturb-frame: vision or audio.",
    ),
    noise_std: float = typer.Option(
        1.0, "--noise-std",
        help="Standard deviation of the noise, times each feature's std over the sample's real frames.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise."),
    out: Path | None = typer.Option(
        None, "--out", "-o",
        help="Folder for attention.png/.json, summary_attention.png, perturbation.png "
             "(default: explain/<clip name, id or average-split>).",
    ),
    batch_size: int | None = EvalBatchOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Attention maps of ALMT's hyper-modality layers (language -> audio, language -> vision) for a clip,
    a sample or a split, and what its summary tokens attend to."""
    setup_logging(quiet, verbose)
    if split is not None:
        check_split(split, "--split")
    if average:
        if data is None or clip_or_id is not None or perturb_frame is not None or transcript is not None:
            raise ConfigError("--average explains a split of --data: give --data, and no CLIP_OR_ID, "
                              "--transcript or --perturb-frame")
    elif clip_or_id is None:
        raise ConfigError("give a clip (or, with --data, a sample id) to explain, or --average with --data")
    if data is None and split is not None:
        raise ConfigError("--split goes with --data")
    if data is not None and transcript is not None:
        raise ConfigError("--transcript is for clips; a feature-file sample has its text already")
    if batch_size is not None and not average:
        raise ConfigError("--batch-size goes with --average (one input is scored alone)")
    from .explain import explain as run_explain
    from .explain import explain_average
    from .runs import find_latest_checkpoint

    ckpt = checkpoint if checkpoint is not None else find_latest_checkpoint()
    if average:
        assert data is not None
        name = f"average-{split or 'test'}"
        result = explain_average(ckpt, data, out or default_out(name), split=split or "test", batch_size=batch_size,
                                 device=device, quiet=quiet)
    else:
        assert clip_or_id is not None
        name = clip_or_id if data is not None else Path(clip_or_id).stem
        result = run_explain(ckpt, clip_or_id, out or default_out(name), data=data, split=split,
                             transcript=transcript, perturb_frame=perturb_frame, perturb_modality=perturb_modality,
                             noise_std=noise_std, seed=seed, device=device)
    typer.echo(format_report(result))


def default_out(name: str) -> Path:
    """explain/<name>, the name made safe for a folder (a sample id such as ``video$_$3``)."""
    return Path("explain") / (re.sub(r"[^\w.-]+", "_", name).strip("._") or "sample")


def format_report(ex: Explanation) -> str:
    """A few lines for people: score, where alpha and beta peak per layer, the summary tokens' top input
    positions, the perturbation's effect, the files."""
    import numpy as np

    mean = "mean " if ex.n_samples > 1 else ""
    label = "" if ex.label is None else f" ({mean}label {ex.label:+.3f})"
    lines = [f"{ex.target}: {mean}score {ex.score:+.3f}{label}", *(f"  note: {n}" for n in ex.notes)]
    for j, layer in enumerate(ex.ahl, 1):
        parts = []
        for key, name in (("audio", "alpha"), ("vision", "beta")):
            if key in layer:
                i, k = np.unravel_index(int(np.argmax(layer[key])), layer[key].shape)
                parts.append(f"{name} (language -> {key}) peaks at {layer[key][i, k]:.3f}, token {i} -> {k}")
        lines.append(f"  AHL layer {j}: " + ("; ".join(parts) or "not guided by language"))
    for modality, rep in ex.summary.items():
        lines.append(f"  {modality} summary tokens, top input positions of {rep['positions']} "
                     f"(weights renormalised over them; {rep['timing']}):")
        for row in rep["summary_tokens"]:
            tops = ", ".join(_position(modality, t) for t in row["top"]) or "no real input"
            lines.append(f"    {row['token']} ({100 * row['to_inputs']:.0f}% on real inputs): {tops}")
    if ex.perturbation is not None:
        p = ex.perturbation
        change = {key: max((float(np.abs(a[key] - b[key]).max()) for a, b in zip(p["ahl"], ex.ahl) if key in a),
                           default=0.0) for key in ("audio", "vision")}
        lines.append(f"  noise on {p['modality']} frame {p['frame']}: score {ex.score:+.4f} -> {p['score']:+.4f} "
                     f"(change {p['score'] - ex.score:+.2g}); largest change of alpha {change['audio']:.2g}, "
                     f"of beta {change['vision']:.2g}")
    lines += [f"  wrote {f}" for f in ex.files]
    return "\n".join(lines)


def _position(modality: str, top: dict[str, Any]) -> str:
    where = repr(top["label"]) if top["label"] is not None else f"frame {top['position']}"
    if modality == "text":
        where = f"{top['position']} {where}"
    when = " {:.2f}-{:.2f} s".format(*top["seconds"]) if top["seconds"] else ""
    return f"{where}{when} ({top['weight']:.3f})"


def register(app: typer.Typer) -> None:
    """Add ``explain`` to ``app``."""
    app.command()(explain)
