"""``make test``: the suite as two pytest processes side by side.

    ray lane   the tests marked ``ray`` (they start or join Ray): one process, so one Ray for all of them
    cpu lane   every other test, in a second process beside it

Why two lanes and not one: a Ray test spends much of its wall time waiting (worker processes starting,
the Train controller's polls, a sweep's trial start), and a CPU-only test fills that time. Why not more:
two Ray clusters at once starve each other on a 2-core machine (worker-group start timeouts), so every
Ray test stays in the one lane. (pytest-xdist's ``--dist loadgroup`` would express the same split, but its
group suffix is lost on pytest 9, which spreads Ray tests over every worker.)

    python tests/lanes.py                    # the whole suite (what `make test` and CI run)
    python tests/lanes.py -x -k resume       # extra arguments go to both lanes

The Ray lane prints as it runs; the CPU lane's output follows when both are done, and each lane ends
with its slowest tests. Exit code: the first failing lane's. With no extra arguments a lane that collects
nothing fails the run (pytest's exit code 5): a broken marker must not shrink the suite unnoticed; with a
selection (``-k``, a path) one empty lane is expected and ignored while the other ran tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED


def lane_command(marker: str, basetemp: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", marker, f"--basetemp={basetemp}", *extra]


def combined_exit(codes: dict[str, int], selected: bool) -> int:
    """One exit code for the run from each lane's."""
    failing = {k: c for k, c in codes.items() if c not in (0, NO_TESTS)}
    if failing:
        return next(iter(failing.values()))
    empty = [k for k, c in codes.items() if c == NO_TESTS]
    if len(empty) == len(codes) or (empty and not selected):
        return NO_TESTS
    return 0


def main(argv: list[str]) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="twinflow-lanes-"))
    cpu_log = scratch / "cpu-lane.log"
    t0 = time.monotonic()
    with open(cpu_log, "w") as log:
        cpu = subprocess.Popen(lane_command("not ray", scratch / "cpu", argv), cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"[lanes] cpu lane (not ray) started in the background, output: {cpu_log}", flush=True)
        print("[lanes] ray lane (ray):", flush=True)
        try:
            ray_rc = subprocess.call(lane_command("ray", scratch / "ray", argv), cwd=ROOT)
            ray_s = time.monotonic() - t0
            cpu_rc = cpu.wait()
        except KeyboardInterrupt:
            cpu.terminate()
            cpu.wait()
            raise
    total = time.monotonic() - t0
    print(f"\n[lanes] cpu lane (not ray) output:\n", flush=True)
    print(cpu_log.read_text(), flush=True)
    codes = {"ray": ray_rc, "cpu": cpu_rc}
    rc = combined_exit(codes, selected=bool(argv))
    print(f"[lanes] ray lane exit {ray_rc} after {ray_s:.0f} s, cpu lane exit {cpu_rc}; "
          f"suite {total:.0f} s ({total / 60:.1f} min), exit {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
