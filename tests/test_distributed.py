"""Training in several processes (torchrun, DistributedDataParallel with gloo on CPU): batches
shared out as a one-process run draws them, the same numbers as one process, resume, one writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from synthetic import make_synthetic, make_tiny_text_model
from test_train import AUDIO, TEXT_DIM, TEXT_LEN, VISION, tiny_config
from torch.utils.data import BatchSampler, SequentialSampler
from typer.testing import CliRunner

from almt_pipeline.cli import app
from almt_pipeline.config import config_to_dict
from almt_pipeline.distributed import Group, ShardedBatches, torchrun_command, without_option
from almt_pipeline.evaluate import evaluate
from almt_pipeline.train import train

ROOT = Path(__file__).resolve().parent.parent


def test_each_rank_gets_its_share_of_every_batch():
    batches = BatchSampler(SequentialSampler(range(11)), batch_size=4, drop_last=False)
    ranks = [list(ShardedBatches(batches, Group(rank=r, world=3))) for r in range(3)]
    assert ranks[0] == [[0, 3], [4, 7], [8]]
    assert ranks[1] == [[1], [5], [9]]
    assert ranks[2] == [[2], [6], [10]]
    # the last batch of 3 leaves nothing for rank 3 of 4: a placeholder row (weight 0)
    assert list(ShardedBatches(batches, Group(rank=3, world=4)))[-1] == [-1 - 8]
    assert len(ShardedBatches(batches, Group(rank=0, world=3))) == 3


def test_command_line_helpers():
    assert without_option(["train", "--nproc", "2", "--epochs", "3"], "--nproc") == ["train", "--epochs", "3"]
    assert without_option(["train", "--nproc=2"], "--nproc") == ["train"]
    cmd = torchrun_command(2, ["train", "--out", "r"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-4:] == ["almt_pipeline", "train", "--out", "r"]


def test_under_torchrun_a_run_directory_must_be_given(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["train", "--data", "nowhere.pkl"])
    assert r.exit_code == 1
    assert r.output.startswith("error: under torchrun, pass --out RUN_DIR")


# -- real process groups -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data with 25 training samples (batches 8, 8, 8, 1: the last leaves one rank a placeholder)
    and a dropout-free text model, so that nothing random differs between 1 and 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    text_model = make_tiny_text_model(root / "bert", dropout=0.0)
    data = root / "data.pkl"
    make_synthetic(data, n=(25, 12, 12), text_len=TEXT_LEN, audio=AUDIO, vision=VISION, text_dim=TEXT_DIM, seed=2)
    cfg = tiny_config(text_model, epochs=4, warmup_ratio=0.25)
    config = root / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return root, data, config, cfg


def _torchrun(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(torchrun_command(2, ["train", *args]), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(setup, tmp_path):
    root, data, config, cfg = setup
    one = train(cfg, data, tmp_path / "one", device="cpu", quiet=True)
    proc = _torchrun(["--data", str(data), "--config", str(config), "--out", str(tmp_path / "two"), "-q"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    # one voice: the results are printed once, not once per process
    assert out.count("selected epoch 2 by valid") + out.count("selected epoch 1 by valid") + \
        out.count("selected epoch 3 by valid") + out.count("selected epoch 4 by valid") == 1, out
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["processes"] == 2
    assert json.loads((tmp_path / "two/run.json").read_text())["processes"] == 2
    # The same batches, the same loss: what differs is the order of floating-point sums (each rank
    # sums its share, the all-reduce adds the shares), about 1e-7 relative per step. 1e-4 on
    # losses and metrics after 4 epochs leaves room for that and catches any wrong batch split
    # or loss scaling (those change the numbers from the second decimal on).
    a, b = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-4)
        for split in ("valid", "test"):
            for k in ("MAE", "Corr"):
                assert y[split][k] == pytest.approx(x[split][k], abs=1e-4)
    assert summary["selected_epoch"] == one["selected_epoch"]
    # its checkpoint scores like any other
    result = evaluate(tmp_path / "two/checkpoint", data, device="cpu", quiet=True)
    assert result["metrics"]["MAE"] == pytest.approx(summary["test"]["MAE"], abs=1e-6)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_result(setup, tmp_path):
    root, data, config, cfg = setup
    long_config = root / "long.yaml"
    long_config.write_text(config.read_text().replace("epochs: 4", "epochs: 12"))
    straight = _torchrun(["--data", str(data), "--config", str(long_config), "--out", str(tmp_path / "straight"), "-q"])
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out

    run = tmp_path / "killed"
    proc = _torchrun(["--data", str(data), "--config", str(long_config), "--out", str(run), "-q"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, at once
    proc.wait(timeout=60)
    done = len(_history(run))
    assert 3 <= done < 12, "the run finished before it could be killed"
    resumed = _torchrun(["--resume", "--data", str(data), "--out", str(run), "-q"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in _history(tmp_path / "straight")]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in _history(run)] == strip
    assert (run / "checkpoint/model.safetensors").read_bytes() == \
        (tmp_path / "straight/checkpoint/model.safetensors").read_bytes()


def test_an_auxiliary_objective_is_refused_under_torchrun(setup, tmp_path, monkeypatch):
    """Refused before anything is written or any process group is needed (the check comes first)."""
    root, data, config, cfg = setup
    import dataclasses

    from almt_pipeline import distributed
    from almt_pipeline.errors import ConfigError

    monkeypatch.setattr(distributed, "group_from_env", lambda: Group(rank=0, world=2))
    monkeypatch.setattr(distributed, "join", lambda group, device: device)
    monkeypatch.setattr(distributed, "barrier", lambda group: None)
    monkeypatch.setattr(distributed, "leave", lambda group: None)
    multitask = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="multitask"))
    with pytest.raises(ConfigError, match="trains in one process"):
        train(multitask, data, tmp_path / "refused", device="cpu", quiet=True)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--objective", "multitask"], "error: train.objective multitask trains in one process"),
    (["--data", "missing.pkl"], "error: missing.pkl: feature file not found"),
])
def test_nproc_checks_what_it_can_before_starting_processes(setup, tmp_path, monkeypatch, args, message):
    """One error line from the command, not one per process plus torchrun's report."""
    root, data, config, cfg = setup
    from almt_pipeline import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("launched"))
    r = CliRunner().invoke(app, ["train", "--nproc", "2", "--config", str(config), "--data", str(data),
                                 "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 1 and r.output.startswith(message), r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_killing_torchrun_ends_its_workers(setup, tmp_path):
    root, data, config, cfg = setup
    long_config = root / "longer.yaml"
    long_config.write_text(config.read_text().replace("epochs: 4", "epochs: 200"))
    run = tmp_path / "run"
    proc = _torchrun(["--data", str(data), "--config", str(long_config), "--out", str(run), "-q"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "log.jsonl").is_file():
        time.sleep(0.1)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # torchrun alone: its workers must follow it
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
    lines = len(_history(run))
    time.sleep(2)
    assert len(_history(run)) == lines  # nobody trains on


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
