"""The training job on local storage: a full-parameter DeepSpeed ZeRO-3 run (weights partitioned over
the two workers, consolidated at the end into a loadable transformer and pipeline), NaN losses
(skipped and counted on every rank; a streak stops the run with a message) in a MeanFlow run, DMD2 in
LoRA form (ZeRO-2) and in full form (ZeRO-3, three partitioned copies) stopped and resumed, and a bad shard
stopping the run.

Real parts only: local Ray, Ray Train V2 TorchTrainer with 2 CPU workers, DeepSpeed over gloo, the
tiny random-weight Qwen-Image, sklearn digits.
"""

from __future__ import annotations

import json

import pytest
import torch

from train_support import ZERO3_STEPS, digits_dir, tiny_config, zero3_run

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]


def test_zero3_full_parameter_run_partitions_weights_and_exports_them(ray_local, tiny_qwen_image, tmp_path_factory):
    from twinflow.models.pipeline import TwinFlowQwenImagePipeline
    from twinflow.models.qwen_image import TwinFlowQwenImageTransformer2DModel
    from twinflow.models.loading import load_twinflow_transformer

    # The session's ZeRO-3 run (train_support.zero3_run; test_export exports the same one): full-parameter,
    # self teacher, persistence threshold 0, so even the tiny model's small weights are partitioned.
    cfg, run, outcome = zero3_run(tiny_qwen_image, tmp_path_factory)
    s = outcome.summary
    assert (s["step"], s["stop_reason"]) == (ZERO3_STEPS, "done")
    # Ranks held different TwinFlow blocks, so without padding their passes (and ZeRO-3's gathers)
    # would not have matched.
    assert s["zero3_padding_passes"] > 0

    shard_dir = run / f"checkpoint_step_{ZERO3_STEPS:08d}" / f"step_{ZERO3_STEPS:08d}"
    for rank in (0, 1):  # ZeRO-3: every rank saved its own partition of the weights
        assert (shard_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
        assert (shard_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    rows = [json.loads(x) for x in (run / "final" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ZERO3_STEPS + 1)) and all(r["grad_norm"] > 0 for r in rows)

    trained = TwinFlowQwenImageTransformer2DModel.from_pretrained(run / "final" / "transformer")
    initial = load_twinflow_transformer(tiny_qwen_image)
    t_state, i_state = trained.state_dict(), initial.state_dict()
    assert t_state.keys() == i_state.keys() and any(k.startswith("time_text_embed_2.") for k in t_state)
    moved = [k for k in t_state if not torch.equal(t_state[k], i_state[k])]
    assert len(moved) > len(t_state) // 2  # full-parameter: (almost) every tensor trained
    pipe = TwinFlowQwenImagePipeline.from_pretrained(run / "final" / "pipeline")
    assert all(torch.equal(v, t_state[k]) for k, v in pipe.transformer.state_dict().items())
    images = pipe(prompt=["a handwritten digit one"], height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert (run / "final" / "samples.png").is_file() and (run / "tensorboard").is_dir()


def test_nan_losses_are_skipped_on_every_rank_and_a_streak_stops_a_meanflow_run(ray_local, tiny_qwen_image,
                                                                               tmp_path_factory, tmp_path):
    """Also a rival through the same job (one run, two checks): the objective is MeanFlow (method:
    meanflow, method/meanflow.py) on Ray Train, DeepSpeed ZeRO-2 LoRA, the same data and checkpoints. The
    NaN guard lives in the training loop, so it must hold for any objective, not only TwinFlow's blocks."""
    import dataclasses

    from twinflow.train.trainer import NonFiniteLossError, run_training

    root = tmp_path_factory.getbasetemp()
    # Rank 1's loss is NaN at steps 2, 4 and 5: step 2 is skipped alone; 4 and 5 make a streak of 2.
    cfg = tiny_config(tiny_qwen_image, digits_dir(root), str(tmp_path / "runs"), "nan", sample={"enabled": False},
                      run={"max_steps": 8, "checkpoint_every": 3, "nan_limit": 2},
                      debug={"nan_at_steps": [2, 4, 5], "nan_rank": 1})
    cfg = dataclasses.replace(cfg, method="meanflow", meanflow=dataclasses.replace(cfg.meanflow, unequal_ratio=0.5))
    with pytest.raises(NonFiniteLossError, match=r"^training stopped at step 5: 2 steps in a row had non-finite "
                                                 r"losses \(run\.nan_limit=2; 3 skipped in all\)"):
        run_training(cfg)

    run = tmp_path / "runs" / "nan"
    checkpoints = sorted(p.name for p in run.glob("checkpoint_step_*"))
    assert checkpoints == ["checkpoint_step_00000003"]  # nothing saved after the streak began
    shared = json.loads((run / checkpoints[0] / "twinflow" / "shared.json").read_text())
    rows = {r["step"]: r for r in shared["state"]["history"]}
    assert sorted(rows) == [1, 2, 3] and shared["state"]["skipped_steps"] == 1
    assert rows[2]["step_skipped"] == 1 and rows[2]["loss/total"] is None  # NaN, logged as missing
    assert rows[1]["step_skipped"] == rows[3]["step_skipped"] == 0
    # Skipped means skipped everywhere: the LR schedule did not advance, the next step trained normally.
    assert rows[3]["lr"] == rows[2]["lr"] > rows[1]["lr"]
    for r in (rows[1], rows[3]):
        # the MeanFlow loss, not TwinFlow's blocks, and a real update
        assert r["loss/meanflow"] > 0 and r["grad_norm"] > 0 and r.get("loss/fake") is None
        assert r["loss/total"] == pytest.approx(r["loss/meanflow"], rel=1e-4)


def test_dmd2_lora_trains_its_fake_adapter_beside_deepspeed_and_resumes_it(ray_local, tiny_qwen_image,
                                                                           tmp_path_factory, tmp_path):
    """DMD2 through the same job, LoRA form: the student is DeepSpeed's adapter, the fake score a second
    adapter trained by its own AdamW with gradients all-reduced by hand (train/fake_score.py). A run stopped
    at step 2 and resubmitted restores the fake score with its optimizer: its AdamW has counted every fake
    step of all 4 student steps (5 per micro-batch × 2 micro-batches × 4), not only those since the resume.
    DMD2's GAN term is on (off by default): its head reads the transformer's last hidden state through the
    fake adapter, trains and resumes with the fake score, and stays out of the exported student."""
    import dataclasses

    from safetensors.torch import load_file

    from twinflow.train.trainer import run_training

    root = tmp_path_factory.getbasetemp()
    cfg = tiny_config(tiny_qwen_image, digits_dir(root), str(tmp_path / "runs"), "dmd2", sample={"enabled": False},
                      run={"max_steps": 4, "checkpoint_every": 2, "stop_at_step": 2})
    cfg = dataclasses.replace(cfg, method="dmd2", dmd2=dataclasses.replace(cfg.dmd2, gan_weight=5e-3))
    first = run_training(cfg)
    assert (first.summary["step"], first.summary["stop_reason"]) == (2, "stop_at_step")
    again = run_training(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, stop_at_step=None)))
    s = again.summary
    assert (s["step"], s["stop_reason"], s["resumed_from"]) == (4, "done", [2])

    run = tmp_path / "runs" / "dmd2"
    state = {}
    for step in (2, 4):
        d = run / f"checkpoint_step_{step:08d}" / "twinflow"
        state[step] = (json.loads((d / "shared.json").read_text()), load_file(str(d / "fake_score.safetensors")))
    shared, tensors = state[4]
    fake_steps = {float(v) for k, v in tensors.items() if k.startswith("optimizer/state/") and k.endswith("/step")}
    assert fake_steps == {5 * 2 * 4}
    # the fake adapter kept training after the resume
    weights = {k: v for k, v in tensors.items() if k.startswith("weights/")}
    assert weights and max((v - state[2][1][k]).abs().max().item() for k, v in weights.items()) > 0
    head = [k for k in weights if k.startswith("weights/gan_head.")]
    assert head and max((weights[k] - state[2][1][k]).abs().max().item() for k in head) > 0  # the head too
    for r in shared["state"]["history"]:
        assert r["loss/dm"] > 0 and r["loss/fake_score"] > 0 and r["grad_norm"] > 0 and r["fake_skipped"] == 0
        assert r["loss/gan"] > 0 and r["loss/gan_head"] > 0
        assert r.get("loss/near_diag") is None  # DMD's rows, not TwinFlow's blocks
    lora = load_file(str(run / "final" / "lora" / "adapter.safetensors"))
    assert not any(".fake." in k or "gan_head" in k for k in lora)  # the export carries the student only



def test_dmd2_full_parameter_under_zero3_partitions_all_three_copies_and_resumes(ray_local, tiny_qwen_image,
                                                                                 tmp_path_factory, tmp_path):
    """DMD2 in its full form under ZeRO-3: the paper's three copies, each partitioned over the two workers
    (persistence threshold 0) -- the student in the training engine, the fake score in a second engine with
    its own optimizer, the real score in a third without one (train/fake_score.py). Stopped at step 2 and
    resubmitted: the fake engine's shards come back with its step count (2 fake updates × 2 micro-batches
    per student step: 8 at step 2, 16 at step 4; 8 again at step 4 had the restore failed)."""
    import dataclasses

    from twinflow.files import weights_only_loads
    from twinflow.models.qwen_image import TwinFlowQwenImageTransformer2DModel
    from twinflow.models.loading import load_twinflow_transformer
    from twinflow.train.trainer import run_training

    root = tmp_path_factory.getbasetemp()
    cfg = tiny_config(tiny_qwen_image, digits_dir(root), str(tmp_path / "runs"), "dmd2-zero3",
                      sample={"enabled": False}, model={"mode": "full", "ema": False}, twinflow={"teacher": "self"},
                      deepspeed={"zero_stage": 3, "param_persistence_threshold": 0},
                      optim={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
                      run={"max_steps": 4, "checkpoint_every": 2, "stop_at_step": 2, "export_pipeline": True})
    cfg = dataclasses.replace(cfg, method="dmd2", dmd2=dataclasses.replace(cfg.dmd2, fake_updates=2))
    first = run_training(cfg)
    assert (first.summary["step"], first.summary["stop_reason"]) == (2, "stop_at_step")
    again = run_training(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, stop_at_step=None)))
    s = again.summary
    assert (s["step"], s["stop_reason"], s["resumed_from"]) == (4, "done", [2])
    assert s["zero3_padding_passes"] == 0  # DMD's passes do not depend on a rank's rows: nothing to pad

    run = tmp_path / "runs" / "dmd2-zero3"
    for step, fake_steps in ((2, 8), (4, 16)):
        ckpt = run / f"checkpoint_step_{step:08d}"
        for engine_dir in (ckpt, ckpt / "fake_score"):  # the student's and the fake score's shards
            shards = engine_dir / f"step_{step:08d}"
            for rank in (0, 1):
                assert (shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
                assert (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        with weights_only_loads():
            fake = torch.load(ckpt / "fake_score" / f"step_{step:08d}" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        assert (fake["global_steps"], fake["skipped_steps"]) == (fake_steps, 0)
    rows = [json.loads(x) for x in (run / "final" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["loss/dm"] > 0 and r["loss/fake_score"] > 0 and r["grad_norm"] > 0 and r["fake_skipped"] == 0
    # the exported student is the whole trained transformer, consolidated from its shards
    trained = TwinFlowQwenImageTransformer2DModel.from_pretrained(run / "final" / "transformer").state_dict()
    initial = load_twinflow_transformer(tiny_qwen_image).state_dict()
    assert trained.keys() == initial.keys()
    assert sum(not torch.equal(trained[k], initial[k]) for k in trained) > len(trained) // 2

def test_a_shard_over_the_bad_share_limit_stops_the_run_in_one_line_without_retries(ray_local, tiny_qwen_image,
                                                                                      tmp_path):
    """Bad data is deterministic: the ranks agree on it and return, the driver raises RunInputError
    with the data layer's own message (the same text pre-caching prints). With max_failures 0 a worker
    that raised would surface as Ray's TrainingFailedError instead; with retries it would repeat."""
    from twinflow.data.digits import write_digits_dataset
    from twinflow.train.trainer import RunInputError, run_training

    data = tmp_path / "bad-digits"
    write_digits_dataset(str(data), "parquet", n=48, shards=2, size=64, bad={"undecodable": 6}, bad_shard=1)
    cfg = tiny_config(tiny_qwen_image, str(data), str(tmp_path / "runs"), "bad", sample={"enabled": False},
                      run={"max_steps": 20, "max_failures": 0})
    with pytest.raises(RunInputError) as info:
        run_training(cfg)
    assert str(info.value) == ("shard " + str(data / "shard-00001.parquet") + ": 6 of 30 samples unusable (20.0%: "
                               "undecodable=6) exceeds data.bad_share_limit=0.05; fix or remove the shard, or raise "
                               "data.bad_share_limit")
