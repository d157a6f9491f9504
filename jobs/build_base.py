"""Build the miniature paper's pretrained base: a small Qwen-Image that draws the handwritten digits.

    python jobs/build_base.py                  # the default recipe (what make demo distils), ~6 min on 2 cores
    python jobs/build_base.py --recipe small   # the reduced one the tests share
    python jobs/build_base.py --dry-run        # the recipe, its cache folder, whether it is built

Stages, each with its progress (twinflow/mini/base.py): the 1,797 real digits at 32 px as captioned
parquet -> a tiny AutoencoderKLQwenImage trained on them -> a Qwen-Image pipeline folder (that VAE, the
tiny text encoder with the real Qwen tokenizer, a random QwenImageTransformer2DModel) -> the latent
cache through jobs/precache.py's pipeline -> flow-matching pretraining through jobs/train_qwen.py
(Ray Train + DeepSpeed, from the cache) -> ``pipeline/``, a plain diffusers Qwen-Image folder that
``QwenImagePipeline.from_pretrained`` samples digits from -> report.json (classifier accuracy on VAE
reconstructions and on 50-step samples). Cached under $TWINFLOW_CACHE (default ~/.cache/twinflow)
by the recipe's hash; an interrupted build resumes when re-run. Jobs use it as ``model.path:
digits-base`` (built on first use) and its latent cache as ``data.source: digits-base``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

from twinflow.config.cli import fail, interrupted, use_address  # noqa: E402
from twinflow.config.tree import to_dict  # noqa: E402
from twinflow.mini.recipe import RECIPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    p.add_argument("--dry-run", action="store_true", help="print the recipe and its folder; build nothing")
    p.add_argument("--address", metavar="RAY_ADDRESS", help="Ray cluster (default: $RAY_ADDRESS, else a fresh local Ray)")
    args = p.parse_args(argv)
    use_address(args)
    from twinflow.mini.base import base_dir, build_base, is_built

    recipe = RECIPES[args.recipe]()
    if args.dry_run:
        print(json.dumps({"recipe": to_dict(recipe), "key": recipe.key(), "folder": str(base_dir(recipe)),
                          "built": is_built(recipe)}, indent=2))
        return 0
    from twinflow.files import FileProblem
    from twinflow.train.trainer import RunInputError

    try:
        root = build_base(recipe)
    except (RunInputError, FileProblem) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return interrupted("the same command (finished stages are kept)")
    report = json.loads((root / "report.json").read_text())
    print(json.dumps({"pipeline": str(root / "pipeline"), "cache": str(root / "cache"), **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
