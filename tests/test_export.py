"""Exporting training runs (jobs/export.py, twinflow/export): checkpoints of a ZeRO-2 LoRA run and a
ZeRO-3 full-parameter run become TwinFlowQwenImagePipeline folders that sample at 1 NFE, LoRA files
that diffusers' own loader takes (and that match the merged export), ComfyUI files; the training
job's --dry-run prints the memory plan; bad inputs get one clear error.

Real parts only: two short real training runs (local Ray, Ray Train V2, DeepSpeed over gloo, 2 CPU
workers, the tiny random-weight Qwen-Image, sklearn digits), DeepSpeed's offline ZeRO consolidation,
diffusers' save/load and LoRA loader, PEFT.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from train_support import digits_dir, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]
ROOT = Path(__file__).resolve().parents[1]
STEP = 2
CKPT = f"checkpoint_step_{STEP:08d}"
PROMPT = ["a handwritten digit one"]


def _run(tiny_qwen_image, tmp_path_factory, name: str, **sections):
    from twinflow.train.trainer import run_training

    root = tmp_path_factory.getbasetemp()
    storage = tmp_path_factory.mktemp(f"runs-{name}")
    # lr 1e-2 without warm-up: two Adam steps move every trained weight by ~2e-2, so the trained model's
    # output differs clearly from the base model's (the checks below need that contrast).
    cfg = tiny_config(tiny_qwen_image, digits_dir(root), str(storage), name, sample={"enabled": False},
                      optim={"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
                      run={"max_steps": STEP, "checkpoint_every": STEP}, **sections)
    outcome = run_training(cfg)
    assert (outcome.summary["step"], outcome.summary["stop_reason"]) == (STEP, "done")
    return cfg, storage / name


@pytest.fixture(scope="module")
def lora_run(ray_local, tiny_qwen_image, tmp_path_factory):
    """ZeRO-2 LoRA (rank 4, alpha 8: LoRA scale 2, so alpha handling is visible) with the LoRA-EMA teacher."""
    from twinflow.models.lora import LoraSettings

    return _run(tiny_qwen_image, tmp_path_factory, "export-lora", model={"lora": LoraSettings(rank=4, alpha=8.0)})


@pytest.fixture(scope="module")
def zero3_run(ray_local, tiny_qwen_image, tmp_path_factory):
    """The session's shared ZeRO-3 full-parameter run (train_support.zero3_run), checkpointed at STEP."""
    from train_support import ZERO3_STEPS
    from train_support import zero3_run as shared

    cfg, run, outcome = shared(tiny_qwen_image, tmp_path_factory)
    assert ZERO3_STEPS == STEP and (outcome.summary["step"], outcome.summary["stop_reason"]) == (STEP, "done")
    return cfg, run


def _generate(pipe, steps: int = 1) -> torch.Tensor:
    return pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                output_type="latent").images


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------------------
# ZeRO-2 LoRA
# ---------------------------------------------------------------------------


def test_lora_checkpoint_exports_a_pipeline_and_lora_files_that_diffusers_and_comfyui_names_load(
        lora_run, tiny_qwen_image, tmp_path):
    from twinflow.export.config import ExportConfig
    from twinflow.export.exporter import export
    from twinflow.export.lora_files import load_twinflow_lora
    from twinflow.models.pipeline import TwinFlowQwenImagePipeline

    cfg, run = lora_run
    ckpt = run / CKPT
    assert sorted(p.name for p in (ckpt / f"step_{STEP:08d}").glob("*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]  # ZeRO-2: optimizer state per rank
    out = tmp_path / "exp"
    result = export(ExportConfig(source=str(ckpt), out=str(out), default_steps=1))
    assert (result["step"], result["mode"], result["weights"], result["reused"]) == (STEP, "lora", "online", False)
    lora_dir = out / "lora"

    # The consolidated ZeRO shards are exactly the weights the run ended with (its final/ adapter).
    final = _tensors(run / "final" / "lora" / "adapter.safetensors")
    diffusers_file = _tensors(lora_dir / "pytorch_lora_weights.safetensors")
    e2_file = _tensors(lora_dir / "twinflow_target_embedder.safetensors")
    lora_keys = {k for k in final if not k.startswith("time_text_embed_2.")}
    assert {k.removeprefix("transformer.") for k in diffusers_file} == lora_keys
    assert all(k.startswith("transformer.") and ".lora_" in k for k in diffusers_file)
    assert all(torch.equal(diffusers_file["transformer." + k], final[k]) for k in lora_keys)
    assert set(e2_file) == set(final) - lora_keys and all(torch.equal(e2_file[k], final[k]) for k in e2_file)
    with safe_open(str(lora_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8.0)
    assert not any(m.startswith("time_text_embed_2.") for m in meta["transformer.target_modules"])

    # ComfyUI: diffusion_model. prefix, no PEFT .default, one alpha per module, names 1:1 with diffusers'.
    comfy = _tensors(lora_dir / "comfyui_lora.safetensors")
    assert all(k.startswith("diffusion_model.") and ".default" not in k for k in comfy)
    weights = {k.removeprefix("diffusion_model.") for k in comfy if not k.endswith(".alpha")}
    assert weights == lora_keys
    modules = {k.rsplit(".lora_", 1)[0] for k in lora_keys}
    assert {k.removeprefix("diffusion_model.").removesuffix(".alpha") for k in comfy if k.endswith(".alpha")} == modules
    assert all(float(v) == 8.0 for k, v in comfy.items() if k.endswith(".alpha"))
    assert all(torch.equal(comfy["diffusion_model." + k], final[k]) for k in lora_keys)

    # The merged pipeline folder: loads, carries the sampler presets, samples at 1 NFE.
    merged = TwinFlowQwenImagePipeline.from_pretrained(out / "pipeline")
    assert merged.config.default_steps == 1 and set(merged.config.sampler_presets) == {"1", "2", "4"}
    assert not hasattr(merged.transformer, "peft_config")  # merged: a plain transformer
    merged_state = merged.transformer.state_dict()
    assert all(torch.equal(merged_state[k], v) for k, v in e2_file.items())
    images = merged(prompt=PROMPT, height=64, width=64, generator=torch.Generator().manual_seed(5),
                    output_type="pt").images  # default_steps: 1 NFE
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    merged_latents = _generate(merged)

    # diffusers' loader on the base model + E2 changes the output exactly as the merge does.
    base = TwinFlowQwenImagePipeline.from_pretrained(tiny_qwen_image)
    base_latents = _generate(base)
    load_twinflow_lora(base, lora_dir)
    assert base.config.default_steps == 1
    lora_latents = _generate(base)
    change = (merged_latents - base_latents).abs().max()
    assert change > 1e-2, "training should have moved the output"
    assert (lora_latents - merged_latents).abs().max() < 1e-3 * change

    # diffusers also reads the ComfyUI file (its own converter folds alpha/rank): the same model.
    comfy_pipe = TwinFlowQwenImagePipeline.from_pretrained(tiny_qwen_image)
    comfy_pipe.load_lora_weights(str(lora_dir), weight_name="comfyui_lora.safetensors")
    comfy_pipe.transformer.time_text_embed_2.load_state_dict(
        {k.removeprefix("time_text_embed_2."): v for k, v in e2_file.items()})
    assert (_generate(comfy_pipe) - merged_latents).abs().max() < 1e-3 * change

    # Same request again: the export is reused, not redone.
    assert export(ExportConfig(source=str(ckpt), out=str(out), default_steps=1))["reused"] is True


def test_ema_weights_and_final_folder_and_the_command_line(lora_run, tmp_path):
    from twinflow.export.config import ExportConfig
    from twinflow.export.exporter import export

    cfg, run = lora_run
    out = tmp_path / "ema"
    result = export(ExportConfig(source=str(run / CKPT), out=str(out), use_ema=True, formats=["lora"]))
    assert result["weights"] == "ema" and "pipeline" not in result["files"]
    ema = _tensors(run / "final" / "lora" / "ema_adapter.safetensors")
    online = _tensors(run / "final" / "lora" / "adapter.safetensors")
    exported = _tensors(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(v, ema[k.removeprefix("transformer.")]) for k, v in exported.items())
    assert any(not torch.equal(ema[k], online[k]) for k in ema)  # the EMA lags the online weights

    # From the run's final/ folder through the job's command line (lora files only, bf16).
    job = [sys.executable, str(ROOT / "jobs" / "export.py")]
    dry = subprocess.run(job + ["--checkpoint", str(run), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout[dry.stdout.index("\n{\n") + 1:])
    assert plan["source"]["kind"] == "final" and plan["formats"] == ["pipeline", "lora"]
    assert plan["source"]["step"] == STEP and plan["out"] == str(run / "final" / "export")
    done = subprocess.run(job + ["--checkpoint", str(run / "final"), "--out", str(tmp_path / "cli"),
                                 "--set", "formats=[lora]", "--set", "lora_dtype=bfloat16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout.strip().splitlines()[-1])
    assert manifest["source"]["kind"] == "final" and manifest["files"]["comfyui_lora"] == "lora/comfyui_lora.safetensors"
    bf16 = _tensors(tmp_path / "cli" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, online[k.removeprefix("transformer.")].bfloat16())
               for k, v in bf16.items())


def test_evaluate_hook_exports_a_raw_checkpoint_once(lora_run, tmp_path):
    from evals.checkpoints import resolve_pipeline_folder
    from twinflow.models.pipeline import TwinFlowQwenImagePipeline

    _, run = lora_run
    ckpt = tmp_path / CKPT
    shutil.copytree(run / CKPT, ckpt)
    folder = resolve_pipeline_folder(ckpt)
    assert folder == ckpt / "export" / "pipeline"
    manifest = json.loads((ckpt / "export" / "export.json").read_text())
    assert manifest["files"] == {"pipeline": "pipeline"} and manifest["step"] == STEP
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert resolve_pipeline_folder(ckpt) == folder  # idempotent: reused, not rewritten
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    pipe = TwinFlowQwenImagePipeline.from_pretrained(folder)
    assert torch.isfinite(_generate(pipe)).all()


# ---------------------------------------------------------------------------
# ZeRO-3 full
# ---------------------------------------------------------------------------


def test_zero3_full_checkpoint_exports_the_trained_transformer(zero3_run, tiny_qwen_image, tmp_path):
    from twinflow.export.config import ExportConfig
    from twinflow.export.exporter import export
    from twinflow.models.pipeline import TwinFlowQwenImagePipeline
    from twinflow.models.qwen_image import TwinFlowQwenImageTransformer2DModel
    from twinflow.models.loading import load_twinflow_transformer

    _, run = zero3_run
    shards = run / CKPT / f"step_{STEP:08d}"
    for r in (0, 1):  # every rank holds only its partition of the weights
        assert (shards / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file()
    result = export(ExportConfig(source=str(run / CKPT), out=str(tmp_path / "exp")))
    assert result["mode"] == "full" and set(result["files"]) == {"pipeline"}  # no LoRA files for full runs

    pipe = TwinFlowQwenImagePipeline.from_pretrained(tmp_path / "exp" / "pipeline")
    exported = pipe.transformer.state_dict()
    # The run's own end-of-training export gathered the same weights through DeepSpeed's 16-bit save.
    trained = TwinFlowQwenImageTransformer2DModel.from_pretrained(run / "final" / "transformer").state_dict()
    initial = load_twinflow_transformer(tiny_qwen_image).state_dict()
    assert exported.keys() == trained.keys() and any(k.startswith("time_text_embed_2.") for k in exported)
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert sum(not torch.equal(exported[k], initial[k]) for k in exported) > len(exported) // 2
    images = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------
# inputs that cannot be exported
# ---------------------------------------------------------------------------


def test_bad_inputs_give_one_clear_error(lora_run, zero3_run, tmp_path):
    from twinflow.export.config import ExportConfig
    from twinflow.export.exporter import export
    from twinflow.export.sources import ExportError

    def error(**kw) -> str:
        with pytest.raises(ExportError) as info:
            export(ExportConfig(out=str(tmp_path / "never"), **kw))
        message = str(info.value)
        assert "\n" not in message
        return message

    _, lora = lora_run
    _, zero3 = zero3_run
    assert "no such folder" in error(source=str(tmp_path / "nope"))
    junk = tmp_path / "junk"
    (junk / "step_1").mkdir(parents=True)
    (junk / "latest").write_text("step_1")
    assert "is not a TwinFlow training checkpoint" in error(source=str(junk))
    assert "DeepSpeed shards but no twinflow/shared.json" in error(source=str(junk))

    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora / CKPT, ckpt)
    (ckpt / "twinflow" / "complete_rank_00001").unlink()
    assert "is incomplete: ranks [1] of 2 never marked their shard complete" in error(source=str(ckpt))
    (ckpt / "twinflow" / "complete_rank_00001").write_text("{}")
    (ckpt / f"step_{STEP:08d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "lacks the optimizer shards of ranks [1]" in error(source=str(ckpt))

    assert "does not exist here; pass --base-model" in error(source=str(lora / CKPT), base_model=str(tmp_path / "no-base"))
    assert "has no EMA weights (twinflow.teacher: self" in error(source=str(zero3 / CKPT), use_ema=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not an export"):
        export(ExportConfig(source=str(lora / CKPT), out=str(taken)))

    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--checkpoint", str(junk)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_deepspeed_loads_are_weights_only(tmp_path):
    """The consolidation runs DeepSpeed's torch.load(weights_only=False) calls; inside the wrapper a
    pickle that would construct an arbitrary object is refused."""
    from twinflow.files import weights_only_loads

    path = tmp_path / "evil.pt"
    torch.save({"x": torch.ones(1), "obj": Path("anything")}, path)
    assert isinstance(torch.load(path, weights_only=False)["obj"], Path)  # plain pickle would build it
    with weights_only_loads(), pytest.raises(Exception, match="Unsupported global|WeightsUnpickler"):
        torch.load(path, weights_only=False)
    assert isinstance(torch.load(path, weights_only=False)["obj"], Path)  # switch restored afterwards
