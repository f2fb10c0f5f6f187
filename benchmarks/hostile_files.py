"""Hostile feature files: exit status, first error line and peak memory of loading each one.

Writes every stream of the ``HOSTILE`` table in ``tests/test_hostile_pickles.py`` (object arrays
from raw bytes, shapes beyond their data, ``bytearray(3e9)``, memo-shared list bombs, ...) to a
temporary folder and loads each in a fresh process: ``almt train --data FILE --epochs 1 --quiet``
(default) or a direct ``load_features`` call (``--direct``). Peak RSS is the child's own
``ru_maxrss`` (``os.wait4``). Every child runs under RLIMIT_AS (``--limit-gib``, default 4) and a
timeout, so that code without the loader's checks cannot exhaust the machine: there a case may
end in ``MemoryError`` at the limit, or be killed at the timeout.

    python benchmarks/hostile_files.py                                  # the code of this checkout
    git worktree add /tmp/hostile_before <commit>
    python benchmarks/hostile_files.py --before /tmp/hostile_before     # before/after table

``--before`` runs each case with that checkout first (``PYTHONPATH``, same interpreter), then
with this one, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the hostile streams are defined once, with their tests

from test_hostile_pickles import HOSTILE  # noqa: E402

DIRECT = r"""
import sys
from almt_pipeline.errors import AlmtError
from almt_pipeline.features import load_features
try:
    ff = load_features(sys.argv[1], splits=None, require_labels=False)
    print("loaded", sum(len(str(v)) for s in ff.splits.values() for a in s.values() for v in a.reshape(-1)))
except AlmtError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
"""
CLI = "from almt_pipeline.cli import main; main()"


def run_case(path: Path, code: Path, work: Path, direct: bool, limit: int, timeout: float) -> dict:
    """Load ``path`` with the package at ``code`` in a fresh process; its outcome and peak RSS."""
    if direct:
        cmd = [sys.executable, "-c", DIRECT, str(path)]
    else:
        cmd = [sys.executable, "-c", CLI, "train", "--data", str(path), "--epochs", "1", "--quiet",
               "--out", str(work / f"run_{path.stem}")]
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out, err = work / "stdout.txt", work / "stderr.txt"
    start = time.perf_counter()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        child = subprocess.Popen(cmd, env=env, cwd=work, stdout=fo, stderr=fe, preexec_fn=limit_memory,
                                 start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                os.killpg(child.pid, signal.SIGKILL)
                _, status, usage = os.wait4(child.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
    child.returncode = 0  # reaped above; keeps Popen from waiting again
    seconds = time.perf_counter() - start
    if timed_out:
        outcome = f"killed after {timeout:.0f} s"
    elif os.WIFSIGNALED(status):
        outcome = f"crashed ({signal.Signals(os.WTERMSIG(status)).name})"
    else:
        outcome = f"exit {os.WEXITSTATUS(status)}"
    lines = err.read_text(errors="replace").splitlines() + out.read_text(errors="replace").splitlines()
    first = next((ln for ln in lines if ln.startswith("error: ")), None)
    if first is None:
        first = next((ln for ln in reversed(lines) if ln.strip()), "")  # e.g. a traceback's last line
    traceback = any(ln.startswith("Traceback") for ln in lines)
    return {"outcome": outcome, "line": first.replace(str(path.parent) + "/", ""), "traceback": traceback,
            "peak_mib": usage.ru_maxrss / 1024, "seconds": seconds}


def describe(r: dict, width: int) -> str:
    line = r["line"] if len(r["line"]) <= width else r["line"][: width - 3] + "..."
    tb = ", traceback" if r["traceback"] else ""
    return f"{r['outcome']}{tb}, {r['peak_mib']:,.0f} MiB, {r['seconds']:.1f} s: `{line}`"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, help="an older checkout to run each case with first")
    ap.add_argument("--direct", action="store_true", help="call load_features instead of `almt train`")
    ap.add_argument("--limit-gib", type=float, default=4.0, help="RLIMIT_AS of each child (GiB)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a child is killed")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--width", type=int, default=110, help="characters of the error line shown")
    args = ap.parse_args()
    names = args.cases.split(",") if args.cases else sorted(HOSTILE)
    limit = int(args.limit_gib * (1 << 30))
    import numpy

    print(f"# {platform.platform()}, Python {platform.python_version()}, numpy {numpy.__version__}, "
          f"{os.cpu_count()} CPUs; RLIMIT_AS {args.limit_gib:g} GiB, timeout {args.timeout:g} s, "
          f"{'load_features' if args.direct else 'almt train --epochs 1 --quiet'}")
    codes = ([("before", args.before.resolve())] if args.before else []) + [("after", REPO)]
    header = "| case | file bytes | " + " | ".join(name for name, _ in codes) + " |"
    print(header)
    print("|" + "---|" * (2 + len(codes)))
    with tempfile.TemporaryDirectory(prefix="hostile_") as tmp:
        work = Path(tmp)
        for name in names:
            path = work / f"{name}.pkl"
            path.write_bytes(HOSTILE[name][0])
            cells = [describe(run_case(path, code, work, args.direct, limit, args.timeout), args.width)
                     for _, code in codes]
            print(f"| {name} | {path.stat().st_size:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
