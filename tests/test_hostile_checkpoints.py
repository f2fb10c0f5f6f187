"""Checkpoints and weights files from strangers: each hostile case is one ``error:`` line and exit
status 1 through the CLI, and sizes are refused from the numbers, before anything is built.

The huge-size cases run in a fresh interpreter whose address space is capped (RLIMIT_AS), so a
regression that builds the model fails these tests instead of taking the test run down.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from synthetic import make_synthetic, make_tiny_text_model
from test_checkpoint import FEATURE_META, TEXT_DIM, _cfg
from typer.testing import CliRunner

from almt_pipeline.cli import app
from almt_pipeline.model.almt import ALMT
from almt_pipeline.model.checkpoint import save_checkpoint
from almt_pipeline.model.text_encoder import load_text_model

REPO = Path(__file__).resolve().parent.parent
ADDRESS_LIMIT = 2 << 30  # bytes of address space for the guarded interpreter
MAX_GROWTH = 100 << 20  # resident memory one refused load may add (the tiny model is ~4 MB)

runner = CliRunner()


# ---------------------------------------------------------------- a tiny checkpoint and its inputs

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A valid tiny checkpoint (its source text model deleted); tests edit copies of it."""
    root = tmp_path_factory.mktemp("pristine")
    text_model = make_tiny_text_model(root / "bert")
    cfg = _cfg(text_model)
    bert, tokenizer = load_text_model(str(text_model))
    model = ALMT(cfg.model, bert, TEXT_DIM)
    save_checkpoint(root / "ckpt", model, cfg, tokenizer=tokenizer, text_config=bert.config.to_dict(),
                    feature_meta=FEATURE_META, label_scale="mosi")
    shutil.rmtree(text_model)
    return root / "ckpt"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A feature file that fits the tiny checkpoint, and a clip with a sidecar transcript."""
    root = tmp_path_factory.mktemp("inputs")
    data = root / "features.pkl"
    make_synthetic(data, n=(2, 2, 3), text_len=12, audio=(20, 5), vision=(16, 6), text_dim=TEXT_DIM)
    clip = root / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)  # never decoded: every case fails while loading the checkpoint
    clip.with_suffix(".txt").write_text("a fine film\n")
    return data, clip


def _copy(pristine: Path, dst: Path) -> Path:
    shutil.copytree(pristine, dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def model_size(key: str, value: Any) -> Callable[[Path], None]:
    """Set ``config.model.<key>`` in the checkpoint's config.json."""
    return lambda d: _edit_json(d / "config.json", lambda m: m["config"]["model"].__setitem__(key, value))


def meta_field(key: str, value: Any) -> Callable[[Path], None]:
    """Set a top-level field of the checkpoint's config.json."""
    return lambda d: _edit_json(d / "config.json", lambda m: m.__setitem__(key, value))


def text_size(**values: Any) -> Callable[[Path], None]:
    """Set fields of the text model's BERT config."""
    return lambda d: _edit_json(d / "text_model" / "config.json", lambda c: c.update(values))


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _lying_weights_header(d: Path) -> None:
    """Same tensors and file size, but the header says one tensor is 10^5 x 10^5 floats."""
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["head.weight"]["shape"] = [100_000, 100_000]
    text = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _truncated_weights(d: Path) -> None:
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def _int32_head(d: Path) -> None:
    """The head's weights stored as int32 (same bytes, same size): cast silently before."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    tensors["head.weight"] = tensors["head.weight"].view(torch.int32)
    save_file(tensors, str(d / "model.safetensors"))


def _fifo(name: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)  # reading it would block for ever
    return make


def _huge_tokenizer(d: Path) -> None:
    with open(d / "text_model" / "tokenizer.json", "r+b") as f:
        f.truncate(1 << 30)  # sparse: no disk used, but the tokenizer would read 1 GB


def invoke(command: str, ckpt: Path, inputs: tuple[Path, Path]) -> Any:
    data, clip = inputs
    if command == "evaluate":
        return runner.invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu"])
    return runner.invoke(app, ["predict", str(clip), "--checkpoint", str(ckpt), "--device", "cpu"])


def one_line_error(exit_code: int, output: str, exception: Any = None) -> str:
    assert exit_code == 1, output
    assert exception is None or isinstance(exception, SystemExit), repr(exception)
    assert "Traceback" not in output
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


def test_the_pristine_checkpoint_loads(pristine, inputs, tmp_path):
    """The cases below differ from a checkpoint that evaluates only by their edit."""
    r = invoke("evaluate", _copy(pristine, tmp_path / "ckpt"), inputs)
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- malformed values: one line, in process

MALFORMED = {
    "dim-string": (model_size("dim", "abc"), ["config.json: 'model.dim' must be an integer, got 'abc'"]),
    "dim-null": (model_size("dim", None), ["config.json", "'model.dim' must be an integer, got None"]),
    "dim-float": (model_size("dim", 1.5), ["config.json", "'model.dim' must be an integer, got 1.5"]),
    "dim-list": (model_size("dim", [16]), ["config.json", "'model.dim' must be an integer, got [16]"]),
    "dim-5000-digits": (write("config.json", b'{"config": {"model": {"dim": 1' + b"0" * 5000 + b"}}}"),
                        ["config.json: corrupt JSON"]),
    "config-nested-deep": (write("config.json", b"[" * 200_000), ["config.json: corrupt JSON"]),
    "config-not-an-object": (meta_field("config", [1, 2]), ["config.json", "the config must be a mapping, got [1, 2]"]),
    "text-dim-string": (meta_field("text_dim", "abc"), ["config.json: 'text_dim' 'abc' differs"]),
    "label-scale": (meta_field("label_scale", "imdb"), ["config.json: 'label_scale' must be one of"]),
    "feature-meta-list": (meta_field("feature_meta", [1, 2]), ["config.json: 'feature_meta' must be a JSON object"]),
    "feature-names": (meta_field("feature_meta", {"feature_names": {"audio": 5}}),
                      ["config.json: 'feature_meta.feature_names' must map"]),
    "info-string": (meta_field("info", "x"), ["config.json: 'info' must be a JSON object"]),
    "text-hidden-string": (text_size(hidden_size="abc"),
                           ["text_model/config.json: 'hidden_size' must be an integer, got 'abc'"]),
    "text-layers-float": (text_size(num_hidden_layers=1.5),
                          ["text_model/config.json: 'num_hidden_layers' must be an integer, got 1.5"]),
    "text-heads-indivisible": (text_size(num_attention_heads=3), ["text_model/config.json", "not a multiple"]),
    "text-not-bert": (text_size(model_type="gpt2"), ["text_model/config.json", "only BERT-architecture"]),
    "text-len-past-positions": (text_size(max_position_embeddings=8),
                                ["'model.text_len' 12 exceeds the text model's max_position_embeddings 8"]),
    "weights-header-lies": (_lying_weights_header, ["model.safetensors: corrupt or unreadable weights"]),
    "weights-header-length": (write("model.safetensors", struct.pack("<Q", 2**62) + b"{}"),
                              ["model.safetensors: corrupt or unreadable weights (not a safetensors file"]),
    "weights-text": (write("model.safetensors", b"hello, this is not a safetensors file\n"),
                     ["model.safetensors: corrupt or unreadable weights"]),
    "weights-int32": (_int32_head, ["model.safetensors: tensor 'head.weight' is I32; checkpoints hold float32"]),
    "config-fifo": (_fifo("config.json"), ["config.json: not a regular file"]),
    "tokenizer-1gb": (_huge_tokenizer, ["tokenizer.json: not a regular file of at most 64 MiB"]),
    "weights-truncated": (_truncated_weights, ["model.safetensors: the stored configs describe a model of",
                                               "parameters but the weights file holds at most"]),
}


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_one_line(pristine, inputs, tmp_path, case, command):
    edit, fragments = MALFORMED[case]
    ckpt = _copy(pristine, tmp_path / "ckpt")
    edit(ckpt)
    r = invoke(command, ckpt, inputs)
    line = one_line_error(r.exit_code, r.output, r.exception)
    for fragment in fragments:
        assert fragment in line


# ---------------------------------------------------------------- huge sizes: a guarded interpreter

HUGE = {
    # bounds of the ALMT config
    "fusion-depth": (model_size("fusion_depth", 1_000_000), "'model.fusion_depth' must be in [1, 64]"),
    "ahl-depth": (model_size("ahl_depth", 1_000_000), "'model.ahl_depth' must be in [1, 64]"),
    "dim": (model_size("dim", 10**7), "'model.dim' must be in [1, 65536]"),
    "text-len": (model_size("text_len", 10**9), "'model.text_len' must be in [1, 100000]"),
    "audio-len": (model_size("audio_len", 10**9), "'model.audio_len' must be in [1, 100000]"),
    "n-tokens": (model_size("n_tokens", 10**9), "'model.n_tokens' must be in [1, 100000]"),
    "fusion-heads": (model_size("fusion_heads", 10**6), "'model.fusion_heads' must be in [1, 256]"),
    "embed-mlp": (model_size("embed_mlp_dim", 10**7), "'model.embed_mlp_dim' must be in [1, 65536]"),
    "eval-batch": (lambda d: _edit_json(d / "config.json", lambda m: m["config"]["train"].__setitem__(
        "eval_batch_size", 10**9)), "'train.eval_batch_size' must be in [1, 4096]"),
    "text-dim": (meta_field("text_dim", 10**9), "config.json: 'text_dim' 1000000000 differs"),
    # bounds of the text model's BERT config
    "bert-layers": (text_size(num_hidden_layers=100_000), "'num_hidden_layers' must be in [1, 64]"),
    "bert-hidden": (text_size(hidden_size=10**7), "'hidden_size' must be in [1, 65536]"),
    "bert-vocab": (text_size(vocab_size=10**10), "'vocab_size' must be in [1, 1000000]"),
    "bert-intermediate": (text_size(intermediate_size=10**8), "'intermediate_size' must be in [1, 65536]"),
    "bert-positions": (text_size(max_position_embeddings=10**9), "'max_position_embeddings' must be in [1, 100000]"),
    "bert-types": (text_size(type_vocab_size=10**9), "'type_vocab_size' must be in [1, 1024]"),
    "bert-heads": (text_size(num_attention_heads=10**6), "'num_attention_heads' must be in [1, 256]"),
    # every size within its bound, together far more parameters than model.safetensors holds
    "almt-wide": (model_size("dim", 65536), "parameters but the weights file holds at most"),
    "almt-deep-wide": (lambda d: (model_size("fusion_depth", 64)(d), model_size("fusion_mlp_dim", 65536)(d)),
                       "parameters but the weights file holds at most"),
    "bert-deep-wide": (text_size(num_hidden_layers=64, intermediate_size=65536),
                       "parameters but the weights file holds at most"),
    "bert-big-vocab": (text_size(vocab_size=1_000_000), "parameters but the weights file holds at most"),
}

# Runs each case through the CLI under RLIMIT_AS; prints one JSON line per case and command with
# the resident memory the case added (VmHWM after resetting it through /proc/self/clear_refs).
_GUARDED = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from typer.testing import CliRunner
from almt_pipeline.cli import app
import almt_pipeline.evaluate, almt_pipeline.prediction  # the commands' imports, before measuring

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

runner = CliRunner()
data, clip = sys.argv[2], sys.argv[3]
for arg in sys.argv[4:]:
    case, ckpt = arg.split("=", 1)
    for command in ("evaluate", "predict"):
        if command == "evaluate":
            args = ["evaluate", "--checkpoint", ckpt, "--data", data, "--device", "cpu"]
        else:
            args = ["predict", clip, "--checkpoint", ckpt, "--device", "cpu"]
        before, measured = status("VmRSS"), reset_peak()
        r = runner.invoke(app, args)
        growth = status("VmHWM") - before if measured else None
        exc = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)[:500]
        print(json.dumps({"case": case, "command": command, "exit_code": r.exit_code, "output": r.output,
                          "exception": exc, "growth": growth}), flush=True)
"""


def run_guarded(cases: dict[str, Path], inputs: tuple[Path, Path], limit: int = ADDRESS_LIMIT,
                timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], dict[tuple[str, str], Any]]:
    data, clip = inputs
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [f"{case}={path}" for case, path in cases.items()]
    proc = subprocess.run([sys.executable, "-c", _GUARDED, str(limit), str(data), str(clip), *args],
                          env=env, cwd=data.parent, capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"], r["command"]] = r
    return proc, results


@pytest.fixture(scope="module")
def huge_results(pristine, inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("huge")
    cases = {}
    for case, (edit, _) in HUGE.items():
        cases[case] = _copy(pristine, root / case)
        edit(cases[case])
    return run_guarded(cases, inputs)


@pytest.mark.slow  # one fresh, memory-capped interpreter for all the cases
@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("case", list(HUGE))
def test_huge_sizes_are_refused_before_building(huge_results, case, command):
    proc, results = huge_results
    r = results.get((case, command))
    assert r is not None, f"the guarded interpreter ended (status {proc.returncode}): {proc.stderr[-2000:]}"
    line = one_line_error(r["exit_code"], r["output"], r["exception"])
    assert HUGE[case][1] in line
    assert "config.json" in line or "model.safetensors" in line
    if r["growth"] is not None:
        assert r["growth"] < MAX_GROWTH, f"refusing took {r['growth'] >> 20} MiB"


# ---------------------------------------------------------------- import-weights: what the file is not

class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _zip_without_torch(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")


def _zip_bomb(path: Path) -> None:
    """A torch.save archive whose one entry deflates 16 KiB into 16 MiB."""
    torch.save({"a": torch.ones(4)}, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("w/data/9", b"\x00" * (16 << 20))


WEIGHT_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "text": (lambda p: p.write_text("epoch 3: loss 0.41\n"), "a text file, not a weights file"),
    "empty": (lambda p: p.write_bytes(b""), "empty file, not a weights file"),
    "binary": (lambda p: p.write_bytes(bytes(range(256))), "not a weights file (starts with bytes 00010203"),
    "zip-not-torch": (_zip_without_torch, "a zip archive but not a PyTorch checkpoint written by torch.save"),
    "zip-bomb": (_zip_bomb, "refused: its zip entries would expand to"),
    "pickle-global": (lambda p: p.write_bytes(pickle.dumps({"a": _RunsCode(p.parent / "ran")}, protocol=2)),
                      "refused: the pickle asks to call posix.system"),
    "pickle-framed": (lambda p: p.write_bytes(pickle.dumps({"a": _RunsCode(p.parent / "ran")}, protocol=4)),
                      "a pickle but not PyTorch weights that weights-only loading reads"),
    "torch-zip-global": (lambda p: torch.save({"a": _RunsCode(p.parent / "ran")}, p),
                         "refused: the pickle asks to call posix.system"),
    "bad-safetensors": (lambda p: p.with_suffix(".safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{x"),
                        "not a valid safetensors file"),
}


@pytest.mark.parametrize("case", list(WEIGHT_FILES))
def test_import_weights_names_what_the_file_is_not(tmp_path, case):
    make, expected = WEIGHT_FILES[case]
    path = tmp_path / "almt.pth"
    make(path)
    if case == "bad-safetensors":
        path = path.with_suffix(".safetensors")
    r = runner.invoke(app, ["import-weights", str(path), "--format", "official", "--config", "mosi",
                            "--out", str(tmp_path / "out")])
    line = one_line_error(r.exit_code, r.output, r.exception)
    assert str(path) in line and expected in line
    assert not (tmp_path / "ran").exists()  # no pickled call was made
    assert not (tmp_path / "out").exists()
