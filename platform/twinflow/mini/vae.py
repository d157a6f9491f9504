"""Train the base's tiny ``AutoencoderKLQwenImage`` on the real digits (a plain torch loop on the driver).

Loss: mean squared reconstruction error of a reparameterised sample plus ``kl_weight`` × the KL of
the diagonal posterior to N(0, 1), Adam with a 20-step warm-up. Afterwards ``latents_mean`` /
``latents_std`` in the config are set to the per-channel statistics of the posterior means over the
digits, so normalised latents, (z − mean)/std, are near unit variance as Qwen-Image's are.
Deterministic for a seed (one thread count; the builder fixes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from twinflow.mini.recipe import VaeRecipe


def digit_pixels(size: int) -> tuple[np.ndarray, torch.Tensor]:
    """(labels [N], pixels [N, 3, size, size] in [−1, 1]) of the 1,797 real digits, rendered as the
    image-text data is (twinflow.data.digits.digit_images)."""
    from twinflow.data.digits import digit_images

    pairs = digit_images(1797, size=size)
    arr = np.stack([np.asarray(im, dtype=np.float32) for _, im in pairs]) / 127.5 - 1.0
    return np.array([label for label, _ in pairs]), torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_vae(recipe: VaeRecipe, size: int, seed: int, progress: Callable[[int, dict], None] | None = None):
    """The trained VAE (eval mode) with latents_mean/std set from the data."""
    from diffusers import AutoencoderKLQwenImage

    _, pixels = digit_pixels(size)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=recipe.base_dim, z_dim=recipe.z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * recipe.z_dim,
                                 latents_std=[1.0] * recipe.z_dim)
    opt = torch.optim.Adam(vae.parameters(), recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(pixels), generator=gen), 0
    vae.train()
    for step in range(recipe.steps):
        if pos + recipe.batch_size > len(pixels):
            order, pos = torch.randperm(len(pixels), generator=gen), 0
        x = pixels[order[pos:pos + recipe.batch_size]][:, :, None]  # one frame
        pos += recipe.batch_size
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = ((rec - x) ** 2).mean()
        kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).mean()
        loss = mse + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, {"mse": mse.detach().item(), "kl": kl.detach().item()})
    vae.eval()
    with torch.no_grad():
        mu = torch.cat([vae.encode(pixels[i:i + 256][:, :, None]).latent_dist.mode()[:, :, 0]
                        for i in range(0, len(pixels), 256)])
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mu.mean((0, 2, 3))],
                           latents_std=[round(float(v), 6) for v in mu.std((0, 2, 3))])
    return vae


@torch.no_grad()
def reconstruction_accuracy(vae, size: int, judge, holdout_seed: int = 0) -> dict:
    """The digit classifier on reconstructions of real digits (posterior mean → decode), against the
    same classifier on the digits themselves; over the judge's held-out split when it has one."""
    from sklearn.model_selection import train_test_split

    from twinflow.models.qwen_encode import decode_latents, encode_images
    from twinflow.study.datasets import images_to_digits

    labels, pixels = digit_pixels(size)
    idx = np.arange(len(labels))
    _, test = train_test_split(idx, test_size=0.2, random_state=holdout_seed, stratify=labels)
    x = pixels[test]
    rec = torch.cat([decode_latents(vae, encode_images(vae, x[i:i + 256])) for i in range(0, len(x), 256)])
    as_u8 = lambda t: (t.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)  # noqa: E731
    rec_pred, _ = judge.classify(images_to_digits(as_u8(rec)))
    orig_pred, _ = judge.classify(images_to_digits(as_u8((x + 1) / 2)))
    return {"images": int(len(test)), "accuracy_on_reconstructions": float((rec_pred == labels[test]).mean()),
            "accuracy_on_originals": float((orig_pred == labels[test]).mean()),
            "mse": float(((rec * 2 - 1 - x) ** 2).mean())}


def save_vae(vae, folder: Path) -> None:
    vae.save_pretrained(folder)
