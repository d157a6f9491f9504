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

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config import dump_yaml  # noqa: E402
from twinflow.config.cli import Shortcut, job_parser, fail, interrupted, resolve_config  # noqa: E402
from twinflow.config.errors import ConfigError  # noqa: E402
from twinflow.export.config import PRESETS, ExportConfig  # noqa: E402


SHORTCUTS = (
    Shortcut("--checkpoint", "source={}", "training checkpoint dir, a run's final/ folder, or a run folder"),
    Shortcut("--out", "out={}", "output folder (default: <checkpoint>/export)"),
    Shortcut("--base-model", "base_model={}",
             "the Qwen-Image folder or hub id the run trained on (default: its model.path)"),
    Shortcut("--use-ema", "use_ema=true", "export the EMA teacher's weights", type=bool),
    Shortcut("--default-steps", "default_steps={}", "NFE the pipeline uses by default (default 2)", type=int),
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return job_parser(__doc__, PRESETS, "default", SHORTCUTS).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg: ExportConfig = resolve_config(ExportConfig, args, PRESETS, SHORTCUTS)
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
