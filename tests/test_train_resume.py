"""The training job on the real SeaweedFS S3 server: one uninterrupted ZeRO-2 LoRA run with every
artefact checked, and a run stopped at step 3 and re-submitted, which must continue the exact same
trajectory (step, LR, every loss) as the uninterrupted one.

Real parts only: local Ray, Ray Train V2 TorchTrainer with 2 CPU workers, DeepSpeed ZeRO-2 over
gloo, the tiny random-weight Qwen-Image, sklearn digits, SeaweedFS, TensorBoard, MLflow (file store).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pyarrow.fs as pafs
import pytest
import torch

from train_support import LOSS_KEYS, digits_dir, losses_by_step, read_s3_text, reference_run, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.s3]


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.create_bucket("twinflow-train")


def _download(s3_server, uri: str, dest) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(uri.removeprefix("s3://"), str(dest), source_filesystem=s3_server.filesystem(),
                    destination_filesystem=pafs.LocalFileSystem())


def test_reference_run_on_s3_checkpoints_logs_samples_and_exports(ray_local, tiny_qwen_image, tmp_path_factory,
                                                                   s3_server, bucket, tmp_path, monkeypatch):
    cfg, outcome, mlruns = reference_run(tiny_qwen_image, tmp_path_factory.getbasetemp(), s3_server, bucket)
    s = outcome.summary
    assert (s["step"], s["stop_reason"], s["skipped_steps"], s["resumed"]) == (6, "done", 0, False)
    run = outcome.run_uri
    assert run == f"{bucket}/runs/reference"
    fs = s3_server.filesystem()
    root = run.removeprefix("s3://")

    # Checkpoints every 2 steps, each merged from both ranks' shards, with the sample grid beside it.
    assert sorted(int(c.path.rsplit("_", 1)[1]) for c, _ in outcome.result.best_checkpoints) == [2, 4, 6]
    for step in (2, 4, 6):
        ckpt = f"{root}/checkpoint_step_{step:08d}"
        names = {i.path[len(ckpt) + 1:] for i in fs.get_file_info(pafs.FileSelector(ckpt, recursive=True))}
        for rank in (0, 1):
            assert f"step_{step:08d}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
            assert f"twinflow/rank_{rank:05d}.json" in names and f"twinflow/complete_rank_{rank:05d}" in names
            assert f"twinflow/rank_{rank:05d}.safetensors" in names
        assert {"latest", "twinflow/shared.json", "twinflow/teacher.safetensors", f"samples/step_{step:08d}.png"} <= names
        assert not any(n.startswith("twinflow/") and n.endswith(".pt") for n in names)  # no pickles of ours

    # The planted truncated image is skipped and counted: in the summary (the job's last JSON line) and
    # in the metrics of the checkpoint steps.
    assert s["data"] == {"shards": 2, "seen": 49, "ok": 48, "skipped": {"undecodable": 1}}

    # The metrics log: each step once, finite, LR warming up (optim.warmup_steps = 10).
    rows = [json.loads(line) for line in read_s3_text(s3_server, f"{run}/final/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in LOSS_KEYS), r
        assert r["images_per_s"] > 0 and r["data_wait_s"] >= 0 and r["peak_mem_gb"] > 0
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-3 / 10)
    assert rows[-1]["data/seen"] == 49 and rows[-1]["data/skipped/undecodable"] == 1

    # TensorBoard events copied to S3 and readable.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _download(s3_server, f"{run}/tensorboard", tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("loss/total")] == pytest.approx([r["loss/total"] for r in rows])
    assert "samples" in acc.Tags()["images"]

    # MLflow: params, per-step metrics, sample grids as artifacts.
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=mlruns.as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("twinflow").experiment_id])
    assert mlrun.data.params["model.mode"] == "lora" and mlrun.data.params["deepspeed.zero_stage"] == "2"
    history = client.get_metric_history(mlrun.info.run_id, "loss_total")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id, "samples")} >= {"samples/step_00000006.png"}
    assert mlrun.data.tags["final_dir"] == f"{run}/final"

    # The final artefact: LoRA weights + a ready-to-load TwinFlowQwenImagePipeline with them merged.
    _download(s3_server, f"{run}/final", tmp_path / "final")
    final = tmp_path / "final"
    from PIL import Image

    grid = Image.open(final / "samples.png")
    assert grid.size == (3 * 64, 14 + 64)  # columns 1/2/4 NFE, one (prompt, seed) row, a header

    from safetensors.torch import load_file

    from twinflow.models.lora import load_lora_state_dict, merge_lora
    from twinflow.models.pipeline import TwinFlowQwenImagePipeline
    from twinflow.models.loading import load_twinflow_transformer

    pipe = TwinFlowQwenImagePipeline.from_pretrained(final / "pipeline")
    rebuilt = load_twinflow_transformer(tiny_qwen_image, lora=cfg.model.lora)
    load_lora_state_dict(rebuilt, load_file(final / "lora" / "adapter.safetensors"))
    merge_lora(rebuilt)
    exported = pipe.transformer.state_dict()
    base = load_twinflow_transformer(tiny_qwen_image).state_dict()
    changed = 0
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, exported[name]), name
        changed += not torch.equal(tensor, base[name])
    assert changed > 0  # training moved the merged weights
    ema = load_file(final / "lora" / "ema_adapter.safetensors")
    online = load_file(final / "lora" / "adapter.safetensors")
    assert ema.keys() == online.keys() and any(not torch.equal(ema[k], online[k]) for k in ema)
    image = pipe(prompt="a handwritten digit three", height=64, width=64, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_stopped_run_resumes_on_resubmission_with_identical_trajectory(ray_local, tiny_qwen_image, tmp_path_factory,
                                                                       s3_server, bucket, capsys, monkeypatch, tmp_path):
    """...and logs into the same MLflow run: the resubmission continues the run the first one opened."""
    from twinflow.train.trainer import run_training

    root = tmp_path_factory.getbasetemp()
    _, ref, _ = reference_run(tiny_qwen_image, root, s3_server, bucket)
    ref_rows = [json.loads(x) for x in read_s3_text(s3_server, f"{ref.run_uri}/final/metrics.jsonl").splitlines()]
    cfg = tiny_config(tiny_qwen_image, digits_dir(root), f"{bucket}/runs", "split", run={"stop_at_step": 3},
                      sample={"enabled": False}, logging={"mlflow": "auto"})
    fs = s3_server.filesystem()
    mlruns = tmp_path / "mlruns"  # MLflow 3's file store is opt-in (mlflow-skinny has no database backend)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlruns.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    first = run_training(cfg, storage_filesystem=fs)
    assert (first.summary["step"], first.summary["stop_reason"], first.summary["final"]) == (3, "stop_at_step", None)

    again = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, stop_at_step=None))
    second = run_training(again, storage_filesystem=fs)
    s = second.summary
    assert (s["step"], s["stop_reason"], s["resumed_from"]) == (6, "done", [3])
    rows = [json.loads(x) for x in read_s3_text(s3_server, f"{second.run_uri}/final/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    got, want = losses_by_step(rows), losses_by_step(ref_rows)
    with capsys.disabled():
        print("\nresumed run (stopped after step 3, re-submitted) vs uninterrupted reference:")
        print(" step         lr    loss/total(resumed)  loss/total(reference)  grad_norm(resumed)")
        for step in range(1, 7):
            mark = "  <- resumed here" if step == 4 else ""
            print(f"{step:5d} {got[step]['lr']:10.3e}  {got[step]['loss/total']:.10f}         "
                  f"{want[step]['loss/total']:.10f}           {got[step]['grad_norm']:.8f}{mark}")
        print(f"bitwise identical on every step and metric: {got == want}")
    for step in range(1, 7):
        for key in LOSS_KEYS:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("twinflow").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run for both submissions
    logged = client.get_metric_history(runs[0].info.run_id, "loss_total")
    assert sorted(m.step for m in logged) == [1, 2, 3, 4, 5, 6]  # each step once, across the two
    assert {m.step: m.value for m in logged} == pytest.approx({k: v["loss/total"] for k, v in want.items()})


class _RunsCode:
    """Unpickling this creates a folder: proof, if it ever appears, that a loader executed the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_resume_refuses_crafted_deepspeed_pickles_without_running_them(ray_local, tiny_qwen_image, tmp_path_factory,
                                                                        s3_server, bucket, tmp_path):
    """A copy of the reference run whose last checkpoint's DeepSpeed files were replaced by pickles that
    would run code: re-submitting it ends with one line naming the checkpoint, nothing runs, and Ray
    Train does not retry (max_failures 0: a raising worker would be TrainingFailedError instead)."""
    from twinflow.train.trainer import RunInputError, run_training

    cfg, ref, _ = reference_run(tiny_qwen_image, tmp_path_factory.getbasetemp(), s3_server, bucket)
    runs = tmp_path / "runs"
    _download(s3_server, ref.run_uri, runs / "crafted")
    step_dir = runs / "crafted" / "checkpoint_step_00000006" / "step_00000006"
    marker = tmp_path / "code-ran"
    for f in sorted(step_dir.glob("*.pt")):
        torch.save({"module": _RunsCode(marker), "optimizer_state_dict": _RunsCode(marker)}, f)
    again = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="crafted", storage_path=str(runs),
                                                             max_steps=8, max_failures=0),
                                logging=dataclasses.replace(cfg.logging, mlflow="off"))
    with pytest.raises(RunInputError) as info:
        run_training(again)
    msg = str(info.value)
    assert "\n" not in msg and "checkpoint_step_00000006" in msg and "refused" in msg and "GLOBAL posix.mkdir" in msg
    assert not marker.exists()
