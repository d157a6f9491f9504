"""What a user sees when an input is wrong: one line naming the file or field, exit code 2, nothing
executed from a file, nothing created at a mistyped path, and Ray never joined uninvited.

Real parts: the jobs as subprocesses, torch's weights-only unpickler, safetensors, a second real Ray
cluster started with ``ray start`` for the "stranger's cluster" case.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _job(name: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "jobs" / name), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


class _Ran:
    def __init__(self, returncode: int, out: str, err: str):
        self.returncode, self.stdout, self.stderr = returncode, out, err


def _main(name: str, capsys, *args: str) -> _Ran:
    """A job's main(argv) in this process (the session's Ray), output captured like a subprocess's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / name)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    capsys.readouterr()
    try:
        code = job.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return _Ran(code, out, err)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---------------------------------------------------------------------------
# 1. checkpoint state: no pickles of ours, and crafted files refused
# ---------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    from twinflow.train.state import TrainState, mark_complete, write_rank_state, write_shared_state

    root = tmp_path / "ckpt"
    teacher = {"ema": {"a.lora_A.weight": torch.randn(2, 3)}, "current_decay": 0.5, "num_updates": 3,
               "target_decay": 0.99}
    write_shared_state(root, TrainState(step=7, history=[{"step": 7, "loss": 0.5}]), teacher, 2, "step_00000007",
                       {"run": {"name": "x"}})
    for rank in (0, 1):
        write_rank_state(root, rank, torch.Generator().manual_seed(rank))
        mark_complete(root, rank)
    return root


def test_checkpoint_state_round_trips_through_json_and_safetensors(tmp_path):
    import random

    import numpy as np

    from twinflow.train.state import check_complete, read_rank_state, restore_rng

    root = _checkpoint(tmp_path)
    assert sorted(p.name for p in (root / "twinflow").iterdir()) == [
        "complete_rank_00000", "complete_rank_00001", "rank_00000.json", "rank_00000.safetensors", "rank_00001.json",
        "rank_00001.safetensors", "shared.json", "teacher.safetensors"]
    shared = check_complete(root, 2)
    assert shared["state"]["step"] == 7 and shared["teacher"]["num_updates"] == 3
    assert shared["teacher"]["ema"]["a.lora_A.weight"].shape == (2, 3)
    # The RNG streams continue exactly where they were captured.
    from twinflow.train.state import write_rank_state

    gen = torch.Generator().manual_seed(11)
    random.seed(1), np.random.seed(2), torch.manual_seed(3), gen.manual_seed(4)
    write_rank_state(root, 0, gen)
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    restore_rng(*read_rank_state(root, 0), gen)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen))) == want


@pytest.mark.parametrize("target", ["shared.json", "teacher.safetensors", "rank_00001.json", "rank_00001.safetensors"])
def test_a_crafted_pickle_in_any_state_file_is_refused_and_never_run(tmp_path, target):
    from twinflow.train.state import CheckpointError, check_complete, read_rank_state

    root = _checkpoint(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCode(marker)}, root / "twinflow" / target)
    with pytest.raises(CheckpointError) as info:
        check_complete(root, 2)
        read_rank_state(root, 1)
    assert target in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_of_the_pickle_layout_is_refused_unread(tmp_path):
    from twinflow.train.state import CheckpointError, check_complete

    root = tmp_path / "old"
    (root / "twinflow").mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCode(marker)}, root / "twinflow" / "shared.pt")
    with pytest.raises(CheckpointError, match="older twinflow whose state files are pickles"):
        check_complete(root, 1)
    assert not marker.exists()


def test_deepspeed_pickles_are_read_weights_only(tmp_path):
    from twinflow.files import is_refused_pickle, weights_only_loads

    marker = tmp_path / "code-ran"
    torch.save({"module": _RunsCode(marker)}, tmp_path / "mp_rank_00_model_states.pt")
    with weights_only_loads(), pytest.raises(Exception) as info:
        torch.load(tmp_path / "mp_rank_00_model_states.pt", weights_only=False)  # what DeepSpeed passes
    assert is_refused_pickle(info.value) and not marker.exists()


# ---------------------------------------------------------------------------
# 2. Ray: a fresh local instance unless asked
# ---------------------------------------------------------------------------


def _wait_for_gcs(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                time.sleep(3)  # the GCS port opens before the head's raylet has registered
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"ray start --head --port={port} did not open its port in {timeout:.0f} s")


def _forget_cluster(port: int) -> None:
    """``ray stop`` would also delete Ray's record of the latest ``ray start`` cluster; stopped by signal,
    that record stays and points later state-API lookups (Ray Train's placement-group cleaner in this
    session's runs) at a dead address. Remove it when it is the stranger's."""
    import tempfile

    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if record.is_file() and record.read_text().strip().endswith(f":{port}"):
        record.unlink()


@pytest.mark.ray
def test_jobs_start_their_own_ray_instead_of_joining_a_running_cluster(tmp_path):
    """A cluster started with ``ray start`` (a stranger's) is left alone by default and joined with
    ``--address auto`` / RAY_ADDRESS."""
    port = 6391
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # the stranger's cluster; our probe runs with its own settings
    ray_bin = str(Path(PY).parent / "ray")
    # --block keeps the stranger's cluster tied to this one process: SIGINT to it stops that cluster alone.
    # (``ray stop --force`` would kill every Ray process on the machine, this session's cluster included,
    # and Ray ends a driver whose raylet died -- pytest with it.)
    stranger = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                                 "--include-dashboard=false", "--disable-usage-stats"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    probe = ("import sys; sys.path.insert(0, %r); from twinflow.ray_env import connect; import ray; "
             "connect(num_cpus=1, address=(sys.argv[1] or None)); "
             "print(ray.get_runtime_context().gcs_address)") % str(ROOT / "platform")
    try:
        _wait_for_gcs(port, stranger)
        own = subprocess.run([PY, "-c", probe, ""], capture_output=True, text=True, timeout=180, env=env)
        joined = subprocess.run([PY, "-c", probe, "auto"], capture_output=True, text=True, timeout=180, env=env)
        via_env = subprocess.run([PY, "-c", probe, ""], capture_output=True, text=True, timeout=180,
                                 env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    finally:
        stranger.send_signal(signal.SIGINT)
        try:
            stranger.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stranger.kill()
            stranger.wait()
        _forget_cluster(port)
    for proc in (own, joined, via_env):
        assert proc.returncode == 0, proc.stderr[-2000:]
    address = lambda proc: proc.stdout.strip().splitlines()[-1]  # noqa: E731
    assert address(joined).endswith(f":{port}") and address(via_env).endswith(f":{port}")
    assert not address(own).endswith(f":{port}")


# ---------------------------------------------------------------------------
# 4-6. evaluate and export: no model at a typo, truncated files named, why nothing was scored
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    from evals.mini_data import write_mini_benchmarks

    return write_mini_benchmarks(tmp_path_factory.mktemp("bench") / "benchmarks")


def test_evaluate_never_builds_a_model_at_a_mistyped_path(tmp_path, benchmarks):
    typo = tmp_path / "runs" / "nope" / "final"
    proc = _job("evaluate.py", "--preset", "tiny", "--checkpoint", str(typo), "--set", f"data_root={benchmarks}")
    assert proc.returncode == 2 and "no such folder" in _one_error_line(proc)
    assert not (tmp_path / "runs").exists()


def test_truncated_files_are_one_line_naming_the_file(tmp_path, tiny_qwen_image, benchmarks):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_qwen_image, pipe)
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    ev = _job("evaluate.py", "--preset", "tiny", "--checkpoint", str(pipe), "--set", f"data_root={benchmarks}")
    assert ev.returncode == 2 and str(weights) in _one_error_line(ev) and "truncated" in _one_error_line(ev)

    # A run's final/ folder whose LoRA adapter is truncated: evaluate refuses it although final/pipeline is whole,
    # and export names the adapter.
    final = tmp_path / "final"
    shutil.copytree(tiny_qwen_image, final / "pipeline")
    (final / "lora").mkdir()
    from safetensors.torch import save_file

    adapter = final / "lora" / "adapter.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16)}, str(adapter))
    adapter.write_bytes(adapter.read_bytes()[:-10])
    from twinflow.config import dump_yaml
    from twinflow.train.presets import tiny

    (final / "config.yaml").write_text(dump_yaml(tiny()))
    ev = _job("evaluate.py", "--preset", "tiny", "--checkpoint", str(final), "--set", f"data_root={benchmarks}")
    assert ev.returncode == 2 and str(adapter) in _one_error_line(ev)
    ex = _job("export.py", "--checkpoint", str(final), "--out", str(tmp_path / "export"))
    assert ex.returncode == 2 and str(adapter) in _one_error_line(ex) and ex.stdout == ""
    assert len(ex.stderr.strip().splitlines()) == 1


@pytest.mark.ray
def test_tiny_evaluate_completes_and_stage_errors_are_printed(tmp_path, benchmarks, ray_local, capsys):
    """The README's tiny command exits 0 (the tiny WISE judge answers in the judge's format); a stage
    that cannot run is printed with its reason and written to results.md, exit 3."""
    out = tmp_path / "eval"
    ok = _main("evaluate.py", capsys, "--preset", "tiny", "--set", f"data_root={benchmarks}", "--set",
               f"output_dir={out}", "--limit", "2", "--nfe", "1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    wise = json.loads((out / "wise" / "results.json").read_text())
    assert wise["nfe"]["1"]["coverage"]["scored"] == 2 and wise["scorer"]["reply"] == "constrained"

    broken = _main("evaluate.py", capsys, "--preset", "tiny", "--set", f"data_root={benchmarks}", "--set",
                   f"output_dir={tmp_path / 'eval2'}", "--limit", "2", "--nfe", "1", "--benchmarks", "geneval",
                   "--set", f"geneval.clip={tmp_path / 'no-such-clip'}")
    assert broken.returncode == 3
    line = _one_error_line(broken)
    assert line.startswith("error: geneval: ") and "failed to start" in line
    md = (tmp_path / "eval2" / "geneval" / "results.md").read_text()
    assert "**Stage error:**" in md and "failed to start" in md


# ---------------------------------------------------------------------------
# 7. the smaller items
# ---------------------------------------------------------------------------


def test_precache_dry_run_errors_exit_2(tmp_path):
    proc = _job("precache.py", "--preset", "tiny", "--set", f"data.source={tmp_path / 'missing'}",
                "--set", f"output={tmp_path / 'cache'}", "--dry-run")
    assert proc.returncode == 2 and "missing" in _one_error_line(proc)


def test_preset_names_take_dashes_or_underscores(capsys):
    a = _main("plan.py", capsys, "--preset", "qwen_image_lora_512", "--json")
    b = _main("plan.py", capsys, "--preset", "qwen-image-lora-512", "--json")
    assert a.returncode == b.returncode == 0, a.stderr[-2000:]
    assert json.loads(a.stdout.splitlines()[-1]) == json.loads(b.stdout.splitlines()[-1])
    t = _main("train_qwen.py", capsys, "--preset", "qwen_image_lora", "--dry-run")
    assert t.returncode == 0 and "name: qwen-image-lora" in t.stdout


def test_orphan_captions_in_a_folder_dataset_are_counted(tmp_path):
    from twinflow.data.config import DatasetConfig
    from twinflow.data.digits import write_digits_dataset
    from twinflow.data.ingest import iter_decoded

    info = write_digits_dataset(str(tmp_path / "f"), "folder", n=6, shards=1, size=32, bad={"no_image": 2})
    stats: list = []
    rows = list(iter_decoded(DatasetConfig(source=str(tmp_path / "f"), min_size=8, bad_share_limit=0.5),
                             stats_out=stats))
    assert len(rows) == 6 and info.shards[0]["skipped"] == {"no_image": 2}
    assert stats[0].seen == 8 and stats[0].skipped == {"no_image": 2}
