"""Small real image-text datasets from scikit-learn's bundled handwritten digits, in every layout.

For tests, benchmarks and the CPU demo: the 1,797 8×8 digit scans that ship inside scikit-learn
(real data, no download), upscaled to RGB PNG/JPEG with captions such as "a handwritten digit seven".
Bad samples can be planted on purpose (``bad={"undecodable": 1, "no_caption": 1, ...}``) and the
returned DigitsDataset says exactly what a reader must count, per shard.

Command line (writes local or s3:// with AWS_* variables set)::

    python -m twinflow.data.digits /tmp/digits-pq --format parquet --n 256 --shards 4
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from dataclasses import dataclass, field

import numpy as np

from twinflow.data.config import EMPTY_CAPTION, NO_CAPTION, NO_IMAGE, TOO_SMALL, UNDECODABLE
from twinflow.data.fs import filesystem_for, join, write_bytes_atomic

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


CAPTION_TEMPLATES = ("a handwritten digit {}", "a small black and white photo of the handwritten digit {}")


def caption_for(label: int, index: int = 0) -> str:
    """Caption of sample ``index``; two templates alternate so prompts differ in length."""
    return CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)].format(NUMBER_WORDS[label])


def digit_prompts(templates: int = len(CAPTION_TEMPLATES)) -> list[tuple[str, str, int]]:
    """(key "<class>-<template>", caption, class) for every class × caption template, in a fixed order:
    the prompts of the digits benchmark (evals/digits) and of the training probe ``probe.kind: digits``."""
    if not 1 <= templates <= len(CAPTION_TEMPLATES):
        raise ValueError(f"templates must be in [1, {len(CAPTION_TEMPLATES)}], got {templates}")
    return [(f"{c}-{k}", caption_for(c, k), c) for c in range(len(NUMBER_WORDS)) for k in range(templates)]


def digit_images(n: int, size: int = 32, offset: int = 0,
                 aspects: tuple[float, ...] = (1.0,)) -> list[tuple[int, "PIL.Image.Image"]]:  # noqa: F821
    """``n`` (label, RGB image) pairs from sklearn's digits, cycling if n > 1797; image i is
    ``size`` high and ``size * aspects[i % len(aspects)]`` wide (stretched), for bucketing tests."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for i in range(offset, offset + n):
        j = i % len(digits.images)
        gray = (digits.images[j] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        width = int(round(size * aspects[i % len(aspects)]))
        img = Image.fromarray(gray, mode="L").resize((width, size), Image.Resampling.BICUBIC).convert("RGB")
        out.append((int(digits.target[j]), img))
    return out


def encode(img, image_format: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if image_format in ("jpg", "jpeg") else "PNG", quality=90)
    return buf.getvalue()


@dataclass
class DigitsDataset:
    uri: str
    format: str
    shards: list[dict] = field(default_factory=list)
    """Per shard, what a reader must find: {"name", "seen", "ok", "skipped": {reason: n}}."""

    @property
    def ok(self) -> int:
        return sum(s["ok"] for s in self.shards)

    @property
    def seen(self) -> int:
        return sum(s["seen"] for s in self.shards)

    def skipped(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for k, v in s["skipped"].items():
                out[k] = out.get(k, 0) + v
        return out


def _samples(n: int, size: int, image_format: str, bad: dict[str, int], offset: int,
             aspects: tuple[float, ...]) -> list[tuple[bytes | None, str | None]]:
    from PIL import Image

    samples = [(encode(img, image_format), caption_for(label, offset + j))
               for j, (label, img) in enumerate(digit_images(n, size, offset, aspects))]
    good = samples[0][0]
    for reason, count in bad.items():
        for _ in range(count):
            if reason == UNDECODABLE:
                samples.append((good[: len(good) // 2], "a truncated image file"))
            elif reason == NO_CAPTION:
                samples.append((good, None))
            elif reason == EMPTY_CAPTION:
                samples.append((good, "   "))
            elif reason == TOO_SMALL:
                samples.append((encode(Image.new("RGB", (4, 4), (200, 10, 10)), image_format), "a tiny red square"))
            elif reason == NO_IMAGE:
                samples.append((None, "a caption without its image"))
            else:
                raise ValueError(f"cannot plant bad samples of kind {reason!r}")
    return samples


def write_digits_dataset(uri: str, fmt: str = "parquet", *, n: int = 64, shards: int = 2, size: int = 32,
                         image_format: str = "png", bad: dict[str, int] | None = None, bad_shard: int = 0,
                         image_column: str = "image", text_column: str = "text", aspects: tuple[float, ...] = (1.0,),
                         filesystem=None) -> DigitsDataset:
    """Write ``n`` good digits split over ``shards`` shards, plus ``bad`` samples in shard ``bad_shard``.

    fmt: parquet (one file per shard), webdataset (one tar per shard) or folder (one directory;
    file names sort by shard, so ``files_per_shard`` = rows per shard reproduces the split).
    """
    bad = dict(bad or {})
    fs, root = filesystem_for(uri, filesystem)
    fs.create_dir(root, recursive=True)
    info = DigitsDataset(uri=uri, format=fmt)
    per = [n // shards + (1 if i < n % shards else 0) for i in range(shards)]
    offset = 0
    for s, count in enumerate(per):
        planted = bad if s == bad_shard else {}
        samples = _samples(count, size, image_format, planted, offset, aspects)
        offset += count
        name = f"shard-{s:05d}"
        ext = "jpg" if image_format in ("jpg", "jpeg") else "png"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({image_column: pa.array([b for b, _ in samples], pa.binary()),
                              text_column: pa.array([t for _, t in samples], pa.string())})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            write_bytes_atomic(fs, join(root, f"{name}.parquet"), buf.getvalue())
        elif fmt == "webdataset":
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for i, (image, text) in enumerate(samples):
                    key = f"{name}-{i:06d}"
                    if image is not None:
                        _add(tar, f"{key}.{ext}", image)
                    if text is not None:
                        _add(tar, f"{key}.txt", text.encode())
            write_bytes_atomic(fs, join(root, f"{name}.tar"), buf.getvalue())
        elif fmt == "folder":
            for i, (image, text) in enumerate(samples):
                key = f"{name}-{i:06d}"
                if image is not None:  # no_image: an orphan caption file
                    write_bytes_atomic(fs, join(root, f"{key}.{ext}"), image)
                if text is not None:
                    write_bytes_atomic(fs, join(root, f"{key}.txt"), text.encode())
        else:
            raise ValueError(f"unknown format {fmt!r}: parquet, webdataset or folder")
        info.shards.append({"name": name, "seen": len(samples), "ok": count, "skipped": planted})
    return info


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uri")
    parser.add_argument("--format", default="parquet", choices=["parquet", "webdataset", "folder"])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--image-format", default="png", choices=["png", "jpeg"])
    args = parser.parse_args(argv)
    info = write_digits_dataset(args.uri, args.format, n=args.n, shards=args.shards, size=args.size,
                                image_format=args.image_format)
    print(json.dumps({"uri": info.uri, "format": info.format, "samples": info.ok, "shards": len(info.shards)}))


if __name__ == "__main__":
    main()
