"""Build the miniature paper's pretrained base: a small Qwen-Image that draws the handwritten digits.

    python jobs/build_base.py                  # the default recipe (what make demo distils), ~6 min on 2 cores
    python jobs/build_base.py --preset small   # the reduced one the tests share
    python jobs/build_base.py --dry-run        # the recipe, its cache folder, whether it is built
    python jobs/build_base.py --set pretrain.steps=6000 --dry-run   # any recipe field (mini/recipe.py)

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

import json
import sys

import _code_path  # noqa: E402,F401 - the submitted checkout first on sys.path (jobs/_code_path.py)

from twinflow.config.cli import job_parser, fail, interrupted, resolve_config  # noqa: E402
from twinflow.config.tree import to_dict  # noqa: E402
from twinflow.mini.recipe import RECIPES, BaseRecipe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__, RECIPES, "default")
    p.add_argument("--recipe", dest="preset", choices=sorted(RECIPES), help="the same as --preset")
    args = p.parse_args(argv)
    recipe = resolve_config(BaseRecipe, args, RECIPES)
    from twinflow.mini.base import base_dir, build_base, is_built

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
