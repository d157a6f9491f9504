"""Export a TwinFlow training checkpoint (any ZeRO stage) or a run's final/ folder for inference.

Writes ``<out>/pipeline/`` (a TwinFlowQwenImagePipeline folder: LoRA merged or the full transformer,
sampler presets for 1/2/4 NFE), and for LoRA runs ``<out>/lora/`` (diffusers
pytorch_lora_weights.safetensors, the target-time embedder E2, a ComfyUI file), plus
``<out>/export.json``; ``<out>`` defaults to ``<checkpoint>/export`` (for a run folder: the export/
of its final/ or newest checkpoint). No GPU and no Ray needed: DeepSpeed's offline consolidation
runs on CPU. Tiny, after ``python jobs/train_qwen.py`` (the CPU demo)::

    python jobs/export.py --checkpoint runs/digits-twinflow/checkpoint_step_00000800 --dry-run
    python jobs/export.py --checkpoint runs/digits-twinflow/checkpoint_step_00000800 --use-ema
    python jobs/export.py --checkpoint runs/digits-twinflow/final --out /tmp/digits-export --default-steps 1

On a cluster (the run's storage must be a path the job's node sees, e.g. a shared mount)::

    ray job submit --working-dir . -- python jobs/export.py \\
        --checkpoint /mnt/runs/qwen-image-lora/checkpoint_step_00010000 --out /mnt/exports/qwen-lora-10k

Then::

    pipe = TwinFlowQwenImagePipeline.from_pretrained("<out>/pipeline", dtype=torch.bfloat16)
    image = pipe("a red cat", num_inference_steps=2).images[0]
    # or the LoRA on the base model (diffusers' loader + E2 + the run's sampler presets):
    pipe = TwinFlowQwenImagePipeline.from_pretrained("Qwen/Qwen-Image", dtype=torch.bfloat16)
    twinflow.export.lora_files.load_twinflow_lora(pipe, "<out>/lora")

Options are ExportConfig fields (twinflow/export/config.py); the flags are shortcuts for --set:
--checkpoint (source), --out, --base-model, --use-ema, --default-steps. ``--dry-run`` prints the
resolved config and what would be written, reading only the checkpoint's metadata. Config errors
and unusable inputs (not a checkpoint, missing rank shards, no base model) are one line on stderr,
exit code 2. The last stdout line is the manifest as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

from twinflow.config import dump_yaml  # noqa: E402
from twinflow.config.cli import add_config_args, fail, interrupted, resolve_config  # noqa: E402
from twinflow.config.errors import ConfigError  # noqa: E402
from twinflow.export.config import PRESETS, ExportConfig  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p, PRESETS, "default")
    p.add_argument("--checkpoint", help="training checkpoint dir, a run's final/ folder, or a run folder")
    p.add_argument("--out", help="output folder (default: <checkpoint>/export)")
    p.add_argument("--base-model", help="the Qwen-Image folder or hub id the run trained on (default: its model.path)")
    p.add_argument("--use-ema", action="store_true", help="export the EMA teacher's weights")
    p.add_argument("--default-steps", type=int, help="NFE the pipeline uses by default (default 2)")
    args = p.parse_args(argv)
    short = []
    if args.checkpoint:
        short.append(f"source={args.checkpoint}")
    if args.out:
        short.append(f"out={args.out}")
    if args.base_model:
        short.append(f"base_model={args.base_model}")
    if args.use_ema:
        short.append("use_ema=true")
    if args.default_steps is not None:
        short.append(f"default_steps={args.default_steps}")
    args.overrides = short + args.overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg: ExportConfig = resolve_config(ExportConfig, args, PRESETS)
    from twinflow.export.exporter import export, plan
    from twinflow.export.sources import ExportError

    try:
        if args.dry_run:
            print(dump_yaml(cfg))
            print(json.dumps(plan(cfg), indent=2))
            return 0
        result = export(cfg)
    except (ConfigError, ExportError) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return interrupted("the same command (nothing half-written is kept)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
