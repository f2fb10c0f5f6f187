"""``almt extract --engine ray``: the same file, failures and cache as the local engine.

The Ray tests share one local Ray (2 CPUs) started by this module and extract the sample dataset
(with its transcripts) plus one corrupt clip and one missing clip; two more run the command in a
subprocess (with the local Ray it starts itself) and stop or kill it. The option checks, the
missing-ray error and the scheduler's rules for lost workers (with a stand-in for Ray) need no
Ray; the tests that need it are skipped, saying so, without it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import signal
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from marked_runs import MarkedRun, busy, cmdline, proc_stat
from typer.testing import CliRunner

from almt_pipeline.cli import app
from almt_pipeline.config import config_from_dict
from almt_pipeline.errors import ConfigError, DependencyError, ExtractionError
from almt_pipeline.extractors import ray_engine
from almt_pipeline.extractors.cache import write_entry
from almt_pipeline.extractors.clip import ClipResult
from almt_pipeline.extractors.runner import extract
from almt_pipeline.features import safe_load_pickle

try:
    import ray  # noqa: F401  (only whether it imports)

    HAS_RAY = True
except ImportError:
    HAS_RAY = False
needs_ray = pytest.mark.skipif(not HAS_RAY, reason='ray is not installed (pip install "almt-pipeline[ray]")')
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
runner = CliRunner()

SMALL = {"model": {"text_len": 16, "audio_len": 64, "vision_len": 4},
         "extract": {"visual": {"fps": 2.0, "max_side": 160}}}
SMALL_YAML = "model: {text_len: 16, audio_len: 64, vision_len: 4}\nextract: {visual: {fps: 2.0, max_side: 160}}\n"
N_GOOD = 36  # clips of the sample dataset
MARKER = "ALMT_RAY_TEST_RUN"
START_TIMEOUT_S = 240.0  # a local Ray and two workers loading the models on a busy machine


@pytest.fixture(scope="module")
def cfg():
    from almt_pipeline.extractors.visual import LANDMARKS_FEATURE_NAMES

    small = {**SMALL, "model": {**SMALL["model"], "audio_dim": 33, "vision_dim": len(LANDMARKS_FEATURE_NAMES)}}
    return config_from_dict(small)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, repo_root, data_dir) -> Path:
    """The sample dataset, a corrupt clip (train) and a row whose clip is missing (test)."""
    dst = tmp_path_factory.mktemp("ray") / "dataset"
    shutil.copytree(repo_root / "samples" / "sample_dataset", dst)
    (dst / "Raw" / "bad").mkdir()
    shutil.copy(data_dir / "truncated.mp4", dst / "Raw" / "bad" / "1.mp4")
    with open(dst / "label.csv", "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["bad", "1", "A corrupt clip.", "1.0", "", "", "", "Positive", "train"],
                                 ["bad", "2", "A missing clip.", "0.0", "", "", "", "Neutral", "test"]])
    return dst


@pytest.fixture(scope="module")
def local_run(dataset, cfg, tmp_path_factory):
    """The local engine's file (in this process, one thread, as the Ray workers use)."""
    out = tmp_path_factory.mktemp("local") / "features.pkl"
    return out, extract(dataset, out, cfg, quiet=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray with 2 CPUs for the module; the engine uses it and leaves it running."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(dataset, cfg, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "features.pkl"
    return out, extract(dataset, out, cfg, quiet=True, engine="ray")


def _assert_same_file(a_path: Path, b_path: Path) -> None:
    a, b = safe_load_pickle(a_path), safe_load_pickle(b_path)
    assert set(a) == set(b)
    assert a["meta"] == b["meta"]
    for split in set(a) - {"meta"}:
        assert set(a[split]) == set(b[split]), split
        for key, x in a[split].items():
            y = b[split][key]
            if x.dtype == object:
                assert list(x) == list(y), (split, key)
            else:
                assert x.dtype == y.dtype, (split, key)
                np.testing.assert_array_equal(x, y, err_msg=f"{split}/{key}")


def _failures(out: Path) -> list[dict]:
    with open(out.with_name(f"{out.stem}.failures.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cache_entries(out: Path) -> list[Path]:
    return sorted((out.parent / ".almt_cache").rglob("*.npz"))


# ---------------------------------------------------------------------------------------------
# options and a missing ray: no cluster needed


def test_missing_ray_is_one_line_saying_what_to_install(monkeypatch, dataset, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(DependencyError, match=r'pip install "almt-pipeline\[ray\]"'):
        ray_engine.check(None)
    r = runner.invoke(app, ["extract", str(dataset), "--engine", "ray", "-o", str(tmp_path / "f.pkl")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines == ['error: the ray engine needs Ray, which is not installed: pip install "almt-pipeline[ray]"']
    assert not any(tmp_path.iterdir())  # nothing done before the check


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "head-node:6379", "[::1]:6379"])
def test_good_ray_addresses(address):
    ray_engine.check_address(address)


@pytest.mark.parametrize("address", ["", "localhost", "host:", ":6379", "host:port", "host:0", "host:70000",
                                     "ray://head:10001", "a b:6379", "[::1]"])
def test_bad_ray_address_is_a_config_error(address, dataset, tmp_path):
    with pytest.raises(ConfigError, match="is not 'auto' or HOST:PORT"):
        ray_engine.check_address(address)
    r = runner.invoke(app, ["extract", str(dataset), "--engine", "ray", "--ray-address", address,
                            "-o", str(tmp_path / "f.pkl")])
    assert r.exit_code == 1
    assert r.output.startswith("error: Ray address") and "HOST:PORT" in r.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["--ray-address", "auto"], "--ray-address needs --engine ray"),
    (["--engine", "spark"], "--engine must be local or ray"),
])
def test_engine_options_are_checked(args, message, dataset, tmp_path):
    r = runner.invoke(app, ["extract", str(dataset), *args, "-o", str(tmp_path / "f.pkl")])
    assert r.exit_code == 1 and r.output.startswith(f"error: {message}"), r.output
    with pytest.raises(ConfigError):
        extract(dataset, tmp_path / "f.pkl", engine="spark")
    with pytest.raises(ConfigError, match="only used with the ray engine"):
        extract(dataset, tmp_path / "f.pkl", ray_address="auto")


@needs_ray
def test_nothing_listening_at_the_address_is_one_line(dataset, tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # not this module's Ray, if it runs
    with socket_closed_port() as port:
        r = runner.invoke(app, ["extract", str(dataset), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}",
                                "-o", str(tmp_path / "f.pkl"), "-q"])
    assert r.exit_code == 1
    assert r.output.startswith(f"error: no Ray cluster answers at 127.0.0.1:{port}"), r.output
    assert "Traceback" not in r.output


@needs_ray
@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379"])
def test_the_address_given_is_the_cluster_ray_joins(address, monkeypatch):
    """ray.init is recorded, not run (no second cluster here): a given address reaches it as is,
    so an absent cluster is an error rather than a new local Ray; no address starts a local one."""
    import ray

    calls = []
    monkeypatch.delenv("RAY_worker_niceness", raising=False)  # restored after the test
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_engine.ray_session(address, 2):
        pass
    assert calls[0]["address"] == (address or "local")
    assert ("num_cpus" in calls[0]) == (address is None)
    # a local Ray's workers run at this process's priority, not Ray's default niceness 15
    assert (os.environ.get("RAY_worker_niceness") == "0") == (address is None)  # noqa: SIM112 (Ray's name)


@needs_ray
def test_no_gpu_on_the_cluster_is_an_error_not_a_wait(monkeypatch):
    fake = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0})
    with pytest.raises(ExtractionError, match="the Ray cluster has no GPU"):
        ray_engine.run_clips(fake, config_from_dict({}), "cuda", {0: (None, Path("x"))}, lambda i, o: None, workers=2)


@contextlib.contextmanager
def socket_closed_port():
    """A local TCP port that nothing listens on."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


# ---------------------------------------------------------------------------------------------
# on a local Ray


@needs_ray
@pytest.mark.slow  # extracts the sample dataset twice (~40-80 s)
def test_ray_file_is_identical_to_the_local_engine(local_run, ray_run):
    (local_out, local_sum), (ray_out, ray_sum) = local_run, ray_run
    _assert_same_file(local_out, ray_out)
    for s in (local_sum, ray_sum):
        assert (s.total, s.done, s.extracted, s.cached, s.failed) == (N_GOOD + 2, N_GOOD, N_GOOD, 0, 2)
        assert s.split_counts == {"train": 24, "valid": 6, "test": 6}
    assert ray_sum.to_text().splitlines()[:-2] == local_sum.to_text().splitlines()[:-2]  # but the time


@needs_ray
@pytest.mark.slow  # see above
def test_bad_clips_are_reported_as_by_the_local_engine(local_run, ray_run):
    (local_out, _), (ray_out, ray_sum) = local_run, ray_run
    rows = _failures(ray_out)
    assert rows == _failures(local_out)
    assert [(Path(r["path"]).name, r["error_type"]) for r in rows] == [("1.mp4", "MediaError"), ("2", "InvalidRow")]
    assert "truncated" in rows[0]["message"]
    assert [f.id for f in ray_sum.failures] == ["bad$_$1", "bad$_$2"]


@needs_ray
@pytest.mark.slow  # extracts a few clips again on Ray workers
def test_second_run_resumes_from_the_cache(ray_run, dataset, tmp_path, monkeypatch):
    ray_out, _ = ray_run
    entries = _cache_entries(ray_out)
    assert len(entries) == N_GOOD  # each clip cached by the worker that extracted it
    for entry in entries[:3]:  # as if the first run had been stopped three clips short
        entry.unlink()
    first = tmp_path / "first.pkl"
    shutil.copy(ray_out, first)
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_YAML)
    r = runner.invoke(app, ["extract", str(dataset), "--engine", "ray", "-o", str(ray_out), "-c", str(config), "-q"])
    assert r.exit_code == 1, r.output  # two bad clips
    assert f"{N_GOOD} done (3 extracted, {N_GOOD - 3} from cache), 2 failed" in r.output
    assert len(_cache_entries(ray_out)) == N_GOOD
    _assert_same_file(first, ray_out)


@needs_ray
@needs_proc
@pytest.mark.slow  # extracts the sample dataset on Ray workers, one of which is killed
def test_lost_worker_loses_no_clip(local_run, dataset, cfg, ray_cluster, tmp_path, caplog):
    out = tmp_path / "features.pkl"
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and len(_cache_entries(out)) < 2:
            time.sleep(0.05)
        workers = [pid for pid, cmd in _descendants(os.getpid()).items() if cmd.startswith("ray::ClipWorker")]
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="almt_pipeline"):
        summary = extract(dataset, out, cfg, quiet=True, engine="ray")
    killer.join()
    assert killed, "no Ray worker process found to kill"
    assert any("a Ray worker was lost" in r.getMessage() for r in caplog.records)
    assert (summary.done, summary.failed) == (N_GOOD, 2)
    _assert_same_file(local_run[0], out)


# ---------------------------------------------------------------------------------------------
# the local Ray that `almt extract --engine ray` starts ends with it


class Run(MarkedRun):
    """``almt extract --engine ray`` (its own local Ray) in a subprocess whose processes carry a
    marker in their environment."""

    def __init__(self, dataset: Path, out_dir: Path):
        self.seen: dict[int, str] = {}  # pid -> start time
        out_dir.mkdir(exist_ok=True)
        config = out_dir / "small.yaml"
        config.write_text(SMALL_YAML)
        cmd = [sys.executable, "-m", "almt_pipeline.cli", "extract", str(dataset), "--engine", "ray",
               "--workers", "2", "-o", str(out_dir / "features.pkl"), "-c", str(config), "-q"]
        super().__init__(cmd, out_dir, MARKER, {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})

    def processes(self) -> dict[int, str]:
        """Live processes of this run other than the parent: pid -> command line. Those seen
        before are followed by pid and start time (Ray's agents may wipe their environment)."""
        found = super().processes()
        for pid, started in self.seen.items():
            with contextlib.suppress(OSError, IndexError):
                if pid not in found and proc_stat(str(pid))[0] != "Z" and _start_time(pid) == started:
                    found[pid] = cmdline(str(pid))
        return found

    def note_processes(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(OSError, IndexError):
                self.seen[pid] = _start_time(pid)

    def wait_for_busy_workers(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"extract ended early:\n{self.output()}"
            if _cache_entries(self.out_dir / "features.pkl"):
                self.note_processes()
                return
            time.sleep(0.05)
        pytest.fail(f"no clip finished after {START_TIMEOUT_S} s:\n{self.output()}")


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _descendants(root: int) -> dict[int, str]:
    """Live descendants of process ``root``: pid -> command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                state, ppid = proc_stat(entry.name)
                if state != "Z":
                    parents[int(entry.name)] = ppid
    found: dict[int, str] = {}
    for pid in parents:
        p = pid
        while p in parents and p != root:
            p = parents[p]
        if p == root and pid != root:
            with contextlib.suppress(OSError):
                found[pid] = cmdline(str(pid))
    return found


@pytest.fixture
def busy_run(dataset, tmp_path):
    """An `almt extract --engine ray` subprocess whose workers are extracting; cleaned up after."""
    yield from busy(Run(dataset, tmp_path / "out"))


@needs_ray
@needs_proc
@pytest.mark.slow  # starts a local Ray and two workers that load the models (~15-40 s)
def test_killed_parent_leaves_no_ray_process(busy_run):
    run = busy_run
    assert any("raylet" in c for c in run.processes().values()), run.processes()
    left = run.kill()
    assert left == {}, f"processes of the killed run still alive: {left}"


@needs_ray
@needs_proc
@pytest.mark.slow  # starts a local Ray and two workers that load the models (~15-40 s)
def test_sigterm_stops_ray_keeps_finished_clips_and_says_how_to_resume(busy_run):
    run = busy_run
    rc, output, resume = run.terminate()
    assert rc == 130, output  # SIGTERM takes the Ctrl-C path, although ray.init sets its own handler
    assert len(resume) == 1 and resume[0].startswith("received SIGTERM: "), output
    assert "Traceback" not in output, output
    assert run.wait_until_no_process_left() == {}
    finished = len(_cache_entries(run.out_dir / "features.pkl"))
    assert f"{finished} of {N_GOOD + 2} clips are finished" in resume[0]


# ---------------------------------------------------------------------------------------------
# the scheduler's rules, with a stand-in for Ray (no cluster)


class _FakeRay:
    """Just what the scheduler calls: actors whose calls resolve in the order they were made."""

    class exceptions:  # noqa: N801  (mirrors ray.exceptions)
        class RayError(Exception):
            pass

        class RayActorError(RayError):
            pass

        class ObjectLostError(RayError):
            pass

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref()


class _FakeActor:
    """Returns ``"<clip> by <name>"`` per clip, and dies for good on a clip in ``dies_on``
    (writing ``cache_first``'s cache entry before it goes, as a worker that finished it would)."""

    def __init__(self, ray: _FakeRay, name: str, dies_on: set[str] = frozenset(), cache_first: bool = False):
        self.ray, self.name, self.dies_on, self.cache_first, self.dead = ray, name, dies_on, cache_first, False
        self.ready = types.SimpleNamespace(remote=lambda: self._ref(lambda: name))
        self.extract = types.SimpleNamespace(remote=lambda spec, path: self._ref(lambda: self._extract(spec, path)))

    def _ref(self, work):
        def resolve():
            if self.dead:
                raise _FakeRay.exceptions.RayActorError(f"The actor {self.name} died. More text.")
            return work()
        return resolve

    def _extract(self, spec, cache_path):
        if spec.id in self.dies_on:
            if self.cache_first:
                write_entry(cache_path, _tiny_result(spec.id))
            self.dead = True
            raise _FakeRay.exceptions.RayActorError(f"The actor {self.name} died. More text.")
        return f"{spec.id} by {self.name}"


def _tiny_result(text: str) -> ClipResult:
    z = np.zeros((1, 1), np.float32)
    return ClipResult(text_bert=np.zeros((3, 1), np.float32), text=z, audio=z, vision=z, raw_text=text,
                      transcript_source="label.csv", face_fraction=1.0, duration=1.0)


def _schedule(actors, n_clips, tmp_path):
    clips = {i: (types.SimpleNamespace(id=f"c{i}", path=Path(f"c{i}.mp4")), tmp_path / f"c{i}.npz")
             for i in range(n_clips)}
    done: dict[int, object] = {}

    def finish(i, outcome):
        assert i not in done, f"clip {i} finished twice"
        done[i] = outcome

    ray_engine._Scheduler(actors[0].ray, actors, clips, finish).run()
    return done


def test_a_lost_workers_clips_go_to_the_others(tmp_path, caplog):
    fake = _FakeRay()
    actors = [_FakeActor(fake, "a", dies_on={"c1"}), _FakeActor(fake, "b")]  # a: c0, c1, c4; b: c2, c3
    with caplog.at_level(logging.WARNING, logger="almt_pipeline"):
        done = _schedule(actors, 8, tmp_path)
    assert sorted(done) == list(range(8))
    assert done[0] == "c0 by a"
    assert done[1] == "c1 by b" and done[4] == "c4 by b"  # the clip it was on, and the one waiting
    lost = [r.getMessage() for r in caplog.records if "was lost" in r.getMessage()]
    assert lost == ["a Ray worker was lost (The actor a died); 1 left"]


def test_a_clip_a_lost_worker_had_cached_is_read_from_the_cache(tmp_path):
    fake = _FakeRay()
    actors = [_FakeActor(fake, "a", dies_on={"c1"}, cache_first=True), _FakeActor(fake, "b")]
    done = _schedule(actors, 4, tmp_path)
    assert isinstance(done[1], ClipResult) and done[1].raw_text == "c1"
    assert done[0] == "c0 by a" and done[3] == "c3 by b"


def test_a_clip_that_takes_down_two_workers_stops_the_batch(tmp_path):
    fake = _FakeRay()
    actors = [_FakeActor(fake, name, dies_on={"c1"}) for name in "abc"]
    with pytest.raises(ExtractionError, match=r"c1\.mp4: 2 Ray workers were lost while extracting this clip"):
        _schedule(actors, 6, tmp_path)


def test_every_worker_lost_stops_the_batch(tmp_path):
    fake = _FakeRay()
    actors = [_FakeActor(fake, "a", dies_on={"c0"}), _FakeActor(fake, "b", dies_on={"c1"})]
    with pytest.raises(ExtractionError, match="every Ray worker was lost"):
        _schedule(actors, 4, tmp_path)
