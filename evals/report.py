"""Report files beside the checkpoint: ``eval/<benchmark>/results.json``, ``results.md`` and ``grid.png``.

The markdown table has one row per NFE and one column per tag/category plus overall and coverage,
followed by the reference rows of BENCHMARKS.md §4 (published numbers of the 100-NFE Qwen-Image
that TwinFlow compares against). Every report names its scorer models and says when they are
stand-ins for the official ones, so a number is never quoted without its protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw

from evals.digits.rules import DIGIT_COLUMNS
from evals.geneval.rules import TAGS
from evals.wise.rules import CATEGORIES

COLUMNS = {
    "geneval": list(TAGS),
    "dpg": ["global", "entity", "attribute", "relation", "other"],
    "wise": list(CATEGORIES),
    "digits": DIGIT_COLUMNS,
}
DIGITS = {"geneval": 2, "dpg": 2, "wise": 2, "digits": 3}

# BENCHMARKS.md §4; the Qwen-Image rows are what TwinFlow cites for the 100-NFE teacher.
REFERENCES: dict[str, list[dict[str, Any]]] = {
    "geneval": [
        {"model": "Qwen-Image, 100 NFE (as cited by TwinFlow)", "overall": 0.87,
         "breakdown": dict(zip(TAGS, (0.99, 0.92, 0.89, 0.88, 0.76, 0.77)))},
        {"model": "TwinFlow-Qwen-Image, 1 NFE (third-party quote of the paper, unverified)", "overall": 0.86,
         "breakdown": {}},
    ],
    "dpg": [
        {"model": "Qwen-Image, 100 NFE (as cited by TwinFlow)", "overall": 88.32,
         "breakdown": dict(zip(COLUMNS["dpg"], (91.32, 91.56, 92.02, 94.31, 92.73)))},
    ],
    "wise:legacy": [
        {"model": "Qwen-Image (WISE legacy, GPT-4o judge)", "overall": 0.62,
         "breakdown": dict(zip(CATEGORIES, (0.62, 0.63, 0.77, 0.57, 0.75, 0.40)))},
    ],
    "wise:verified": [
        {"model": "Qwen-Image (WISE_Verified, Qwen3.5 judge)", "overall": 0.5100,
         "breakdown": dict(zip(CATEGORIES, (0.6275, 0.5250, 0.5583, 0.3417, 0.4833, 0.2500)))},
    ],
}


def references(benchmark: str, protocol: str = "") -> list[dict[str, Any]]:
    return REFERENCES.get(f"{benchmark}:{protocol}" if benchmark == "wise" else benchmark, [])


def protocol_label(benchmark: str, scorer: Mapping[str, Any]) -> str:
    """The name a number is quoted under; stand-ins say so."""
    if benchmark == "digits":
        return (f"digits (classifier held-out accuracy {scorer['heldout_accuracy']:.3f}, threshold "
                f"{scorer['threshold']}; overall = accuracy; Fréchet / precision / recall in {scorer['feature_dims']}-d PCA)")
    if benchmark == "geneval":
        rules = "" if scorer.get("official_rules", True) else ", non-official rules"
        return f"GenEval (HF port: {scorer['detector']} + {scorer['clip']}{rules})"
    if benchmark == "dpg":
        return (f"DPG-Bench ({scorer['mode']} mode; VQA stand-in {scorer['vqa']}:{scorer['vqa_model']} "
                "for mPLUG-large)")
    judge = scorer["judge_model"]
    stand_in = [] if scorer.get("official_judge") else ["open judge, not comparable"]
    if scorer.get("prompt_source") == "built-in paraphrase":
        stand_in.append("paraphrased judge prompt")
    suffix = f"; {', '.join(stand_in)}" if stand_in else ""
    return f"WISE {scorer['protocol']} (judge {judge}{suffix})"


def _fmt(v: Any, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(benchmark: str, results: Mapping[str, Any]) -> str:
    cols = COLUMNS[benchmark]
    digits = DIGITS[benchmark]
    lines = [f"# {results['label']}", "",
             f"checkpoint: `{results['checkpoint']}`  ", f"generator: `{results['generation']['generator']}`, "
             f"seed {results['generation']['seed']}, prompts {results['prompts']}"
             + (" (subset: --limit)" if results.get("subset") else ""), ""]
    lines.append("| " + " | ".join(["NFE"] + cols + ["overall", "scored / expected"]) + " |")
    lines.append("|" + "---|" * (len(cols) + 3))
    footnote = False
    for nfe, r in sorted(results["nfe"].items(), key=lambda kv: int(kv[0])):
        overall = r.get("overall")
        cell = _fmt(overall, digits)
        if overall is None and r.get("overall_over_scored") is not None:
            cell = _fmt(r["overall_over_scored"], digits) + "*"
            footnote = True
        cov = r["coverage"]
        cov_txt = f"{cov['scored']} / {cov['expected']}" + (
            f" ({cov['failed']} failed, {cov['skipped']} skipped, {cov['missing']} missing)"
            if not cov["complete"] else "")
        lines.append("| " + " | ".join([str(nfe)] + [_fmt(r["breakdown"].get(c), digits) for c in cols]
                                       + [cell, cov_txt]) + " |")
    for ref in results.get("references", []):
        lines.append("| " + " | ".join([f"*{ref['model']}*"] + [_fmt(ref["breakdown"].get(c), digits) for c in cols]
                                       + [_fmt(ref["overall"], digits), ref.get("kind", "published")]) + " |")
    lines.append("")
    for err in results.get("stage_errors", []):
        lines.append(f"**Stage error:** {err}  ")
    for nfe, r in sorted(results["nfe"].items(), key=lambda kv: int(kv[0])):
        for reason, n in sorted(r["coverage"].get("reasons", {}).items()):
            lines.append(f"NFE {nfe}: {n} × {reason}  ")
    if footnote:
        lines.append("\\* incomplete run: category weights renormalised over the scored ids; the official overall "
                     "is only defined on all 1,000 prompts.")
    if benchmark == "dpg":
        lines.append("DPG breakdown columns use the raw answers (the official convention), so they are not a "
                     "decomposition of the overall; see results.json for both modes and the L2 categories.")
    lines.append("Scorer: " + json.dumps(results["scorer"], sort_keys=True))
    return "\n".join(lines) + "\n"


def image_grid(rows: Sequence[tuple[str, Sequence[Path]]], thumb: int = 128) -> Image.Image:
    """Rows = NFE, columns = the first few prompts; each cell the prompt's first image, downscaled."""
    ncols = max((len(paths) for _, paths in rows), default=1) or 1
    label_w = 56
    grid = Image.new("RGB", (label_w + ncols * thumb, max(1, len(rows)) * thumb), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, paths) in enumerate(rows):
        draw.text((4, r * thumb + thumb // 2 - 6), label, fill="black")
        for c, p in enumerate(paths):
            try:
                with Image.open(p) as im:
                    grid.paste(im.convert("RGB").resize((thumb, thumb)), (label_w + c * thumb, r * thumb))
            except (OSError, ValueError):
                draw.rectangle([label_w + c * thumb, r * thumb, label_w + (c + 1) * thumb - 1, (r + 1) * thumb - 1],
                               outline="red")
    return grid


def write_reports(out_dir: Path, benchmark: str, results: Mapping[str, Any],
                  grid_rows: Sequence[tuple[str, Sequence[Path]]]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "grid": out_dir / "grid.png"}
    tmp = paths["json"].with_suffix(".json.part")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str))
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown(benchmark, results))
    image_grid(grid_rows).save(paths["grid"])
    return paths
