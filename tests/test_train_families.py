"""Every family through the real training job: a short SANA LoRA run (Ray Train, 2 CPU workers, DeepSpeed
ZeRO-2 over gloo, raw digits encoded in the workers by SANA's own Gemma-2 text side and DC-AE), its sample
grid, the end-of-run pipeline folder loaded by SANA's pipelines, and the export job's pipeline and LoRA
files from its raw checkpoint. (Qwen-Image runs through the same job in test_train_runs / _resume /
_faults; the backbone contract itself is tests/test_models_families.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

from train_support import digits_dir, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]


def test_a_sana_lora_run_trains_samples_and_exports_through_the_same_job(ray_local, tmp_path_factory, tmp_path):
    import dataclasses

    from diffusers import SanaPipeline
    from safetensors.torch import load_file

    from twinflow.export.config import ExportConfig
    from twinflow.export.exporter import export
    from twinflow.models.sana import TwinFlowSanaPipeline
    from twinflow.named import resolve_model
    from twinflow.train.trainer import run_training

    model = resolve_model("tiny-sana")
    cfg = tiny_config(model, digits_dir(tmp_path_factory.getbasetemp()), str(tmp_path / "runs"), "sana",
                      run={"max_steps": 2, "checkpoint_every": 2, "export_pipeline": True},
                      optim={"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
                      sample={"nfe": [1, 2], "height": 32, "width": 32})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=32))
    s = run_training(cfg).summary
    assert (s["step"], s["stop_reason"], s["skipped_steps"]) == (2, "done", 0)

    run = tmp_path / "runs" / "sana"
    rows = [json.loads(x) for x in (run / "final" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 and r["loss/total"] > 0 for r in rows)
    assert (run / "final" / "samples.png").is_file()
    adapter = load_file(str(run / "final" / "lora" / "adapter.safetensors"))
    assert any(k.startswith("time_text_embed_2.") for k in adapter)  # E2 trains in LoRA mode, as on Qwen-Image
    assert any(".attn2.to_k." in k for k in adapter)  # the family's default targets: cross-attention too

    kwargs = dict(prompt=["a handwritten digit three"], height=32, width=32, output_type="pt")
    pipe = TwinFlowSanaPipeline.from_pretrained(run / "final" / "pipeline")
    one = pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert one.shape == (1, 3, 32, 32) and torch.isfinite(one).all()
    stock = SanaPipeline.from_pretrained(run / "final" / "pipeline")  # diffusers' own class loads the export
    assert type(stock.transformer).__name__ == "TwinFlowSanaTransformer2DModel"

    # the export job from the raw ZeRO-2 checkpoint: the same merged transformer, and the LoRA files
    result = export(ExportConfig(source=str(run / "checkpoint_step_00000002"), out=str(tmp_path / "export")))
    assert set(result["files"]) >= {"pipeline", "diffusers_lora", "target_embedder"}
    exported = TwinFlowSanaPipeline.from_pretrained(tmp_path / "export" / "pipeline")
    final, again = pipe.transformer.state_dict(), exported.transformer.state_dict()
    assert final.keys() == again.keys() and all(torch.allclose(final[k], again[k]) for k in final)
