"""The study's two datasets: sklearn's handwritten digits and a 2-D Gaussian mixture.

digits     1,797 real 8×8 grey-scale digits (UCI, bundled with scikit-learn), flattened to 64
           values scaled from [0, 16] to [−1, 1]; class-conditional on the digit label.
mixture2d  K isotropic Gaussians with centres on a ring of radius 2 (σ = 0.15). The seed picks the
           ring's rotation and mildly unequal mode weights (Dirichlet(20)), so mass balance is
           measured against known, non-uniform targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Digits:
    images: torch.Tensor  # [N, 64] in [−1, 1]
    labels: torch.Tensor  # [N] int64

    num_classes: int = 10
    data_dim: int = 64

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.labels), (n,), generator=generator)
        return self.images[idx], self.labels[idx]


def load_digits() -> Digits:
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    images = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0
    return Digits(images=images, labels=torch.tensor(d.target, dtype=torch.long))


def images_to_digits(images) -> np.ndarray:
    """Generated or real images -> the digits' own space: [N, 64] float in [−1, 1].

    ``images``: PIL images, or uint8 arrays [N, H, W] / [N, H, W, 3] with H, W multiples of 8. Grey is
    the channel mean; 8×8 is an area average over (H/8)×(W/8) blocks, so a 32-px rendering of a digit
    comes back to (nearly) the 8×8 scan it was upscaled from.
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("L") if hasattr(im, "convert") else im) for im in images])
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 4:
        arr = arr.mean(axis=3)
    n, h, w = arr.shape
    if h % 8 or w % 8:
        raise ValueError(f"digit images must have sides that are multiples of 8, got {h}x{w}")
    small = arr.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (small / 127.5 - 1.0).reshape(n, 64)


def load_digits_at(size: int) -> Digits:
    """The real digits as a size-px pipeline sees them, brought back to 8×8 (``images_to_digits``): the
    reference set for judging generated images of that size, with the same resampling losses."""
    from twinflow.data.digits import digit_images

    pairs = digit_images(1797, size=size)
    images = torch.tensor(images_to_digits([im for _, im in pairs]), dtype=torch.float32)
    return Digits(images=images, labels=torch.tensor([label for label, _ in pairs], dtype=torch.long))


def digits_to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 64] in [−1, 1] -> [N, 8, 8] uint8 for image grids."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(-1, 8, 8).numpy()


@dataclass
class Mixture2D:
    centres: torch.Tensor  # [K, 2]
    weights: torch.Tensor  # [K], sums to 1
    std: float = 0.15

    data_dim: int = 2

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.centres[k] + self.std * torch.randn(n, 2, generator=generator)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        return self.sample(n, generator), None


def make_mixture(modes: int = 8, seed: int = 0, radius: float = 2.0, std: float = 0.15) -> Mixture2D:
    rng = np.random.default_rng(seed)
    offset = rng.uniform(0, 2 * math.pi / modes)
    angles = offset + 2 * math.pi * np.arange(modes) / modes
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    weights = rng.dirichlet(np.full(modes, 20.0))
    return Mixture2D(centres=torch.tensor(centres, dtype=torch.float32),
                     weights=torch.tensor(weights, dtype=torch.float32), std=std)
