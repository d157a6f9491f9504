"""Where each benchmark's images live, in the layout its official scorer reads.

  GenEval  <images>/<NNNNN>/metadata.jsonl  (that prompt's JSON object) and <NNNNN>/samples/<kkkkk>.png
  DPG      <images>/<item_id>.png           one 2x2 grid of R x R tiles, tiles at (0,0) (R,0) (0,R) (R,R)
  WISE     <images>/<prompt_id>.png
  digits   <images>/<class>-<template>/samples/<kkkkk>.png and metadata.jsonl (GenEval's layout)
so ``evaluation/evaluate_images.py``, ``compute_dpg_bench.py --pic-num 4 --resolution R`` and
``gpt_eval.py`` could score the same folders. ``<images>`` is ``<out>/<benchmark>/nfe<N>/images``.

Files are produced as bytes by the generation actors (``render``) and written by the driver
(``write``) through a temporary name and a rename, so a killed run never leaves a half image that a
resumed run would mistake for a finished one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps

from evals.prompts import Item


PER_PROMPT_FOLDERS = ("geneval", "digits")


def images_per_item(benchmark: str, geneval_n: int) -> int:
    return {"geneval": geneval_n, "digits": geneval_n, "dpg": 4, "wise": 1}[benchmark]


def image_dir(out: Path, benchmark: str, nfe: int) -> Path:
    return Path(out) / benchmark / f"nfe{nfe}" / "images"


def expected_files(benchmark: str, root: Path, item: Item, n: int) -> list[Path]:
    if benchmark in PER_PROMPT_FOLDERS:
        return [root / item.key / "samples" / f"{k:05d}.png" for k in range(n)] + [root / item.key / "metadata.jsonl"]
    return [root / f"{item.key}.png"]


def image_files(benchmark: str, root: Path, item: Item, n: int) -> list[Path]:
    return [p for p in expected_files(benchmark, root, item, n) if p.suffix == ".png"]


def is_complete(benchmark: str, root: Path, item: Item, n: int) -> bool:
    return all(p.is_file() and p.stat().st_size > 0 for p in expected_files(benchmark, root, item, n))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def tile_grid(tiles: Sequence[Image.Image]) -> Image.Image:
    """Four R x R tiles -> one 2R x 2R grid in DPG's order (top-left, top-right, bottom-left, bottom-right)."""
    if len(tiles) != 4:
        raise ValueError(f"a DPG grid needs 4 tiles, got {len(tiles)}")
    w, h = tiles[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for i, t in enumerate(tiles):
        grid.paste(t.convert("RGB").resize((w, h)) if t.size != (w, h) else t.convert("RGB"), ((i % 2) * w, (i // 2) * h))
    return grid


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """The four tiles of a DPG grid; R is half the grid side (the grid must be square with an even side)."""
    w, h = grid.size
    if w != h or w % 2:
        raise ValueError(f"DPG grid must be square with an even side (2R x 2R), got {w}x{h}")
    r = w // 2
    return [grid.crop((x, y, x + r, y + r)) for (x, y) in ((0, 0), (r, 0), (0, r), (r, r))]


def render(benchmark: str, item: Item, images: Sequence[Image.Image]) -> dict[str, bytes]:
    """Relative path -> file bytes for one prompt's generated images."""
    if benchmark in PER_PROMPT_FOLDERS:
        files = {f"{item.key}/samples/{k:05d}.png": png_bytes(im) for k, im in enumerate(images)}
        files[f"{item.key}/metadata.jsonl"] = json.dumps(item.meta).encode()
        return files
    if benchmark == "dpg":
        return {f"{item.key}.png": png_bytes(tile_grid(images))}
    if benchmark == "wise":
        return {f"{item.key}.png": png_bytes(images[0])}
    raise ValueError(f"unknown benchmark {benchmark!r}")


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def read_images(benchmark: str, root: Path, item: Item, n: int) -> list[bytes]:
    """Raw bytes of the prompt's image files, for shipping to a scorer actor."""
    return [p.read_bytes() for p in image_files(benchmark, root, item, n)]


def decode(data: bytes) -> Image.Image:
    """PNG/JPEG bytes -> RGB image, EXIF orientation applied (as the GenEval evaluator does)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return ImageOps.exif_transpose(im).convert("RGB")
