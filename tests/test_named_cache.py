"""The cache of named inputs (models/tiny_qwen.build_once): one build per target, also when two
processes ask for it at the same moment (two jobs on one machine, the suite's two pytest workers)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from twinflow.models.tiny_qwen import build_once


def _slow_build(tmp: Path, log: str) -> None:
    with open(log, "a") as f:  # one line per build that actually ran
        f.write("built\n")
    time.sleep(1.0)  # long enough for the other process to arrive while this one is building
    (tmp / "payload.txt").write_text("ok")
    (tmp / "done").write_text("")


def _ask(target: str, log: str, out: str) -> None:
    folder = build_once(Path(target), "done", lambda tmp: _slow_build(tmp, log))
    Path(out).write_text((folder / "payload.txt").read_text())


def test_two_processes_asking_at_once_build_the_target_once(tmp_path):
    target, log = tmp_path / "cache" / "thing", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ask, args=(str(target), str(log), str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text().splitlines() == ["built"]  # the second waited and reused the first one's folder
    assert [(tmp_path / f"out{i}").read_text() for i in range(2)] == ["ok", "ok"]
    assert sorted(p.name for p in target.parent.iterdir()) == [".thing.lock", "thing"]  # no temp folder left


def test_an_interrupted_build_is_redone(tmp_path):
    target, log = tmp_path / "thing", tmp_path / "builds.log"
    target.mkdir()  # a folder without its marker: what a killed build leaves behind after the rename
    (target / "partial").write_text("")
    build_once(target, "done", lambda tmp: _slow_build(tmp, str(log)))
    assert (target / "done").exists() and not (target / "partial").exists()
    assert log.read_text().splitlines() == ["built"]
