"""Image bytes -> training pixels: decode, orient, resize, centre-crop or bucket, normalise.

Decoded images travel through Ray Data as uint8 HWC (4x smaller than float); the float [-1, 1]
tensor is made only where the batch is assembled (``to_model_pixels``).
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np

from twinflow.data.config import EMPTY_CAPTION, NO_CAPTION, NO_IMAGE, TOO_SMALL, UNDECODABLE, DatasetConfig

# Sides of every output image are multiples of this: the VAE downsamples by 8 and the
# transformer packs 2x2 latent patches.
SIDE_MULTIPLE = 16


class SkipSample(Exception):
    """A sample that is unusable for a countable reason (one of config.SKIP_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@lru_cache(maxsize=32)
def make_buckets(resolution: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    """(height, width) buckets of area ~resolution², sides multiples of 16, aspect <= max_aspect.

    Widths step by 16 pixels; each width gets the height that keeps the area closest to the
    target. The square bucket (resolution, resolution) is always present.
    """
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    w = SIDE_MULTIPLE
    while w <= resolution * max_aspect:
        h = max(SIDE_MULTIPLE, int(round(area / w / SIDE_MULTIPLE)) * SIDE_MULTIPLE)
        if max(h, w) / min(h, w) <= max_aspect + 1e-9:
            buckets.add((h, w))
        w += SIDE_MULTIPLE
    return tuple(sorted(buckets, key=lambda hw: hw[1] / hw[0]))


def nearest_bucket(height: int, width: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, in log space (2:1 and 1:2 are
    equally far from 1:1)."""
    target = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - target))


def target_size(height: int, width: int, cfg: DatasetConfig) -> tuple[int, int]:
    """Output (height, width) for an image of this size under ``cfg.crop``."""
    if cfg.crop == "center":
        return cfg.resolution, cfg.resolution
    return nearest_bucket(height, width, make_buckets(cfg.resolution, cfg.bucket_max_aspect))


def clean_caption(caption) -> str:
    """The caption as a stripped string, or SkipSample(no_caption / empty_caption)."""
    if caption is None:
        raise SkipSample(NO_CAPTION)
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SkipSample(NO_CAPTION, f"caption is not UTF-8 ({exc.reason})") from exc
    text = str(caption).strip()
    if not text:
        raise SkipSample(EMPTY_CAPTION)
    return text


def decode_image(data: bytes | None, cfg: DatasetConfig) -> np.ndarray:
    """Encoded bytes -> uint8 RGB [H, W, 3] at the target size, or SkipSample."""
    from PIL import Image, ImageOps

    if data is None or len(data) == 0:
        raise SkipSample(NO_IMAGE)
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if min(width, height) < cfg.min_size:
            raise SkipSample(TOO_SMALL, f"{width}x{height} < min_size {cfg.min_size}")
        out_h, out_w = target_size(height, width, cfg)
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the
        # target, which is most of the decode cost for photos far larger than 512².
        scale = max(out_w / width, out_h / height)
        img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if img.size != (width, height):  # EXIF rotation or draft changed the geometry
            width, height = img.size
            if cfg.crop == "buckets":
                out_h, out_w = target_size(height, width, cfg)
        # fit = scale to cover (out_w, out_h), then crop the centre; BICUBIC with PIL's
        # built-in antialiasing on downscale.
        img = ImageOps.fit(img, (out_w, out_h), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        arr = np.asarray(img, dtype=np.uint8)
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        # PIL signals truncated / unknown / malformed files with these
        raise SkipSample(UNDECODABLE, f"{type(exc).__name__}: {exc}") from exc
    if arr.shape != (out_h, out_w, 3):
        raise SkipSample(UNDECODABLE, f"decoded to unexpected shape {arr.shape}")
    return arr


def _to_rgb(img):
    """RGB, with transparency composited on white (palette/LA/RGBA); 16-bit and CMYK converted."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr / top * 255.0).astype(np.uint8), mode="L")
    return img.convert("RGB")


def to_model_pixels(images) -> "torch.Tensor":  # noqa: F821
    """uint8 [B, H, W, 3] (array or list of equal-shape arrays) -> float32 [B, 3, H, W] in [-1, 1]."""
    import torch

    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) or images.dtype == object else images
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)
