"""The evaluation pool on a local Ray cluster, end to end from a tiny random-weight Qwen-Image folder:
generation actors -> GenEval (tiny Mask2Former + CLIP) and DPG-Bench (tiny BLIP) scorer actors ->
records -> results.json / results.md / grid.png; resume, an actor killed mid-run, a scorer that cannot
start, the watcher, resource requests, and the job's command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evals.config import DPGConfig, EvalConfig, GenEvalConfig, GenerationConfig, PoolConfig, StageConfig
from evals.dpg import rules as dpg_rules
from evals.geneval import rules as ge_rules
from evals.pool import StageError, actor_options, check_resources
from evals.records import RecordStore

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from evals.mini_data import COCO80_GENEVAL, write_mini_benchmarks
    from evals.tiny_models import build_all
    from twinflow.models.tiny_qwen import build_tiny_qwen_image

    root = tmp_path_factory.mktemp("evals-pool")
    data = write_mini_benchmarks(root / "benchmarks")
    models = build_all(root, COCO80_GENEVAL, bias_class="bench", with_qwen_vl=False)
    models["qwen-image"] = build_tiny_qwen_image(root / "qwen-image", "tiny")
    return {"root": root, "data": data, **models}


def make_cfg(env, out, **changes) -> EvalConfig:
    stage = dict(num_actors=1, num_cpus=1.0, num_gpus=0.0, shard_size=2, batch_size=4)
    cfg = EvalConfig(
        checkpoint=str(env["qwen-image"]), output_dir=str(out), data_root=str(env["data"]),
        benchmarks=["geneval", "dpg"], nfe=[1, 2], grid_prompts=3,
        generation=GenerationConfig(max_sequence_length=16),
        geneval=GenEvalConfig(images_per_prompt=2, resolution=32, detector=str(env["mask2former"]),
                              clip=str(env["clip"]), detector_short_edge=64, detector_long_edge=107),
        dpg=DPGConfig(questions_csv=str(env["data"] / "dpg_bench" / "dpg_bench.csv"), questions_blob="",
                      tile_resolution=32, vqa_model=str(env["blip"])),
        pool=PoolConfig(device="cpu", generate=StageConfig(**stage), geneval=StageConfig(**stage),
                        dpg=StageConfig(**stage), wise=StageConfig(**stage)))
    for k, v in changes.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def first_run(env, ray_local):
    from evals.runner import evaluate

    out = env["root"] / "run1" / "eval"
    cfg = make_cfg(env, out)
    return cfg, out, evaluate(cfg)


def test_end_to_end_numbers_layout_and_reports(first_run, env):
    cfg, out, results = first_run
    ge = results["geneval"]
    assert ge["label"].startswith("GenEval (HF port")
    for nfe in ("1", "2"):
        r = ge["nfe"][nfe]
        assert r["coverage"] | {"failures": []} == {"expected": 6, "generated": 6, "scored": 6, "skipped": 0,
                                                     "failed": 0, "missing": 0, "complete": True, "failures": [],
                                                     "reasons": {}}
        assert r["images"] == {"expected": 12, "scored": 12}
        # The tiny detector only ever sees benches: "a photo of a bench" passes, the cow, the dog and
        # the cat prompts cannot.
        assert r["breakdown"]["single_object"] == 0.5
        assert r["breakdown"]["two_object"] == 0.0 and r["breakdown"]["position"] == 0.0
        assert r["overall"] == pytest.approx(sum(r["breakdown"].values()) / len(r["breakdown"]))  # tag mean
    # Official layout: <NNNNN>/metadata.jsonl + samples/<k>.png; DPG 2x2 grids named <item_id>.png
    img = out / "geneval" / "nfe1" / "images"
    assert json.loads((img / "00003" / "metadata.jsonl").read_text())["tag"] == "counting"
    assert sorted(p.name for p in (img / "00003" / "samples").iterdir()) == ["00000.png", "00001.png"]
    from PIL import Image

    with Image.open(out / "dpg" / "nfe2" / "images" / "partiprompts97.png") as grid:
        assert grid.size == (64, 64)

    # The aggregated numbers are exactly the rules applied to the per-item records.
    latest = RecordStore(out / "geneval" / "records.jsonl").latest()
    images = [{"tag": r["data"]["tag"], "correct": im["correct"], "prompt_index": k}
              for (n, k), r in latest.items() if n == 1 for im in r["data"]["images"]]
    assert ge_rules.aggregate(images)["overall"] == pytest.approx(ge["nfe"]["1"]["overall"])

    d = results["dpg"]["nfe"]["1"]
    assert d["coverage"]["scored"] == 3 and d["coverage"]["complete"]
    assert d["dropped_official_quirk"] == ["partiprompts97"]  # its q2 depends on the skipped first row
    assert d["modes"]["official"]["scored_prompts"] == 2 and d["modes"]["fixed"]["scored_prompts"] == 3
    dlatest = RecordStore(out / "dpg" / "records.jsonl").latest()
    assert all(len(r["data"]["tiles"]) == 4 and r["data"]["tile_size"] == 32 for r in dlatest.values())
    rows = dpg_rules.read_rows((env["data"] / "dpg_bench" / "dpg_bench.csv").read_text())
    answered = {k: [{int(q): a for q, a in t.items()} for t in r["data"]["tiles"]] for (n, k), r in dlatest.items()
                if n == 1}
    fixed = dpg_rules.aggregate(dpg_rules.build_questions(rows, "fixed"), answered, "fixed")
    assert fixed["overall"] == pytest.approx(d["modes"]["fixed"]["overall"])
    assert "mPLUG" in results["dpg"]["label"] and "official mode" in results["dpg"]["label"]

    md = (out / "geneval" / "results.md").read_text()
    assert "| NFE | single_object | two_object | counting | colors | position | color_attr | overall |" in md
    assert "| 1 | 0.50 |" in md and "| 2 | 0.50 |" in md and "Qwen-Image, 100 NFE" in md and "| 0.87 |" in md
    with Image.open(out / "geneval" / "grid.png") as g:
        assert g.size[1] == 2 * 128  # one row per NFE
    assert (out / "summary.md").read_text().count("# ") >= 2
    saved = json.loads((out / "geneval" / "results.json").read_text())
    assert saved["scorer"]["detector"] == str(env["mask2former"]) and saved["generation"]["generator"] == "diffusers"


def test_rerun_resumes_without_redoing_work_and_refuses_mixed_settings(first_run, env):
    from evals.runner import evaluate

    cfg, out, results = first_run
    lines_before = (out / "geneval" / "records.jsonl").read_text().count("\n")
    again = evaluate(cfg)
    for bench in ("geneval", "dpg"):
        assert again[bench]["pool"]["generate"]["tasks"] == 0 and again[bench]["pool"]["score"]["tasks"] == 0
        assert again[bench]["nfe"]["1"]["overall"] == results[bench]["nfe"]["1"]["overall"]
    assert (out / "geneval" / "records.jsonl").read_text().count("\n") == lines_before
    other_seed = make_cfg(env, out, generation=GenerationConfig(max_sequence_length=16, seed=1))
    with pytest.raises(ValueError, match="other generation settings.*seed"):
        evaluate(other_seed)


def _copy_images(src: Path, dst: Path, bench: str) -> None:
    shutil.copytree(src / bench, dst / bench, ignore=shutil.ignore_patterns("records.jsonl", "results.*", "grid.png"))


def test_an_actor_killed_mid_run_costs_a_retry_not_coverage(first_run, env, tmp_path):
    import ray

    from evals.runner import Hooks, evaluate

    cfg0, out0, results = first_run
    out = tmp_path / "eval"
    _copy_images(out0, out, "geneval")  # same images: only the scoring stage runs
    stage = StageConfig(num_actors=2, num_cpus=1.0, num_gpus=0.0, shard_size=1)
    cfg = make_cfg(env, out, benchmarks=["geneval"],
                   pool=PoolConfig(device="cpu", max_attempts=3, geneval=stage))
    killed = []

    def killer(pool):
        # Kill whichever actor is in the middle of a shard, once, as soon as one is.
        deadline = time.time() + 60
        while not killed and time.time() < deadline:
            busy = pool.busy_actors()
            if busy:
                killed.append(busy[0])
                ray.kill(busy[0], no_restart=True)
                return
            time.sleep(0.01)

    def on_shard(stage_name, pool, shard, records):
        if stage_name == "geneval" and not hasattr(on_shard, "started"):
            on_shard.started = threading.Thread(target=killer, args=(pool,), daemon=True)
            on_shard.started.start()

    res = evaluate(cfg, hooks=Hooks(on_shard=on_shard))["geneval"]
    stats = res["pool"]["score"]
    assert killed and stats["actor_deaths"] >= 1 and stats["retried_shards"] >= 1 and stats["failed_shards"] == 0
    for nfe in ("1", "2"):
        assert res["nfe"][nfe]["coverage"]["complete"]
        assert res["nfe"][nfe]["breakdown"] == results["geneval"]["nfe"][nfe]["breakdown"]
    keys = [(r["nfe"], r["key"]) for r in RecordStore(out / "geneval" / "records.jsonl").read()]
    assert len(keys) == 12 and len(set(keys)) == 12  # every item exactly once


def test_a_scorer_that_cannot_start_is_reported_with_full_coverage_accounting(first_run, env, tmp_path):
    from evals.runner import evaluate

    _, out0, _ = first_run
    out = tmp_path / "eval"
    _copy_images(out0, out, "geneval")
    cfg = make_cfg(env, out, benchmarks=["geneval"], nfe=[1])
    cfg.geneval.clip = str(tmp_path / "no-such-clip")
    res = evaluate(cfg)["geneval"]
    assert any("actors failed to start" in e for e in res["stage_errors"])
    cov = res["nfe"]["1"]["coverage"]
    assert cov["expected"] == 6 and cov["generated"] == 6 and cov["missing"] == 6 and not cov["complete"]
    assert res["nfe"]["1"]["overall"] is None


def test_watch_scores_new_checkpoints_and_skips_raw_ones(first_run, env, tmp_path):
    from evals.checkpoints import WATCH_STATE
    from evals.runner import watch

    run = tmp_path / "run"
    exported = run / "checkpoint_000001"
    exported.mkdir(parents=True)
    (exported / "pipeline").symlink_to(env["qwen-image"], target_is_directory=True)
    # Same pipeline and settings as the first run: its images are reused, only scoring runs.
    _copy_images(first_run[1], exported / "eval", "geneval")
    raw = run / "checkpoint_000002"
    raw.mkdir()
    (raw / "model.pt").write_bytes(b"\0")
    cfg = make_cfg(env, "", benchmarks=["geneval"], nfe=[1], limit=1)
    cfg.checkpoint, cfg.output_dir, cfg.watch_dir = "", "", str(run)
    cfg.watch.settle_s, cfg.watch.poll_s, cfg.watch.exit_when_idle = 0.0, 0.0, True
    done = watch(cfg)
    assert done == {str(exported): "evaluated", str(raw): "needs_conversion"}
    res = json.loads((exported / "eval" / "geneval" / "results.json").read_text())
    assert res["pool"]["generate"]["tasks"] == 0 and res["pool"]["score"]["tasks"] == 1
    assert res["nfe"]["1"]["coverage"]["complete"] and res["nfe"]["1"]["breakdown"] == {"single_object": 1.0}
    state = json.loads((run / WATCH_STATE).read_text())
    assert "is not a TwinFlow training checkpoint" in state[str(raw)]["detail"]
    assert watch(cfg) == {}  # nothing new


def test_gpu_actors_request_the_eval_resource_and_missing_resources_fail_fast(ray_local):
    gpu = actor_options("cuda", 1.0, 1.0, "twinflow_eval", {"env_vars": {"A": "1"}})
    assert gpu["num_gpus"] == 1.0 and gpu["resources"] == {"twinflow_eval": 1.0} and gpu["runtime_env"]
    cpu = actor_options("cpu", 2.0, 1.0, "twinflow_eval")
    assert "num_gpus" not in cpu and "resources" not in cpu and cpu["num_cpus"] == 2.0
    with pytest.raises(StageError, match="twinflow_eval.*--resources"):
        check_resources({"num_cpus": 1, "resources": {"twinflow_eval": 1}}, "geneval")
    with pytest.raises(StageError, match="0 GPU"):
        check_resources({"num_cpus": 1, "num_gpus": 1}, "geneval")
    check_resources(cpu | {"num_cpus": 1}, "geneval")
    from evals.runner import stage_device

    # An API-judge stage asks for no GPU and so runs on CPU even in a GPU pool.
    assert stage_device(StageConfig(num_gpus=0.0), "cuda") == "cpu"
    assert stage_device(StageConfig(num_gpus=1.0), "cuda") == "cuda"
    assert stage_device(StageConfig(num_gpus=1.0), "cpu") == "cpu"


def test_job_command_line_dry_run_and_errors(tmp_path):
    job = [sys.executable, str(ROOT / "jobs" / "evaluate.py")]
    ok = subprocess.run(job + ["--checkpoint", "/x", "--benchmarks", "geneval,wise", "--nfe", "1,4", "--limit", "3",
                               "--set", "pool.geneval.num_actors=2", "--dry-run"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "benchmarks: [geneval, wise]" in ok.stdout and "nfe: [1, 4]" in ok.stdout and "limit: 3" in ok.stdout
    bad = subprocess.run(job + ["--checkpoint", "/x", "--benchmarks", "dpg", "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "dpg.questions_csv" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    both = subprocess.run(job + ["--preset", "tiny", "--watch", str(tmp_path), "--dry-run"], capture_output=True,
                          text=True, timeout=120)
    assert both.returncode == 0 and "watch_dir: " + str(tmp_path) in both.stdout
    missing = subprocess.run(job + ["--checkpoint", str(tmp_path / "nope"), "--benchmarks", "geneval",
                                    "--set", f"data_root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
