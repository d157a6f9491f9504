"""Sample grids during training: fixed prompts × seeds as rows, NFE (1/2/4) as columns.

Each grid runs TwinFlow's any-step sampler (method/sampler.py, the released few-step settings)
on the trained adapter, from the same noise every time, so grids compare across steps. The
prompts are encoded once at start (rank 0 loads the text encoder, then drops it; ZeRO-3 ranks
get the embeddings by broadcast, because under ZeRO-3 every rank must run the network with
rank 0). Rank 0 keeps the VAE to decode. A grid is a PNG: a header row with the NFE labels,
then one row per (prompt, seed).
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from twinflow.method.sampler import few_step, ode, sample
from twinflow.train.config import SampleSettings

HEADER_PX = 14


class SampleGrid:
    def __init__(self, settings: SampleSettings, model_path: str, rank: int, world: int, zero3: bool,
                 device: torch.device, encoder=None, max_sequence_length: int = 512, encode_dtype: str = "auto",
                 probe_prompts: list[str] | None = None):
        """``encoder``: an already loaded twinflow.data.encode.PipelineEncoder to reuse (raw data);
        ``probe_prompts``: prompts the quality probe renders (encoded now, while the encoder is loaded)."""
        from twinflow.models.families import backbone_for

        self.backbone = backbone_for(model_path)
        self.settings = settings
        self.rank = rank
        self.device = device
        self.all_ranks = zero3
        self.active = rank == 0 or zero3
        self.rows = [(p, s) for p in settings.prompts for s in settings.seeds]
        vae_cfg = self.backbone.vae_class().load_config(model_path, subfolder="vae")
        self.latent_hw = self.backbone.latent_grid(vae_cfg, settings.height, settings.width)
        self.cond: dict[str, torch.Tensor] | None = None
        self.probe_cond: dict[str, torch.Tensor] | None = None
        self.base_columns: list[torch.Tensor] = []
        self.vae = None
        if rank == 0:
            own = encoder is None
            if own:
                from twinflow.data.encode import PipelineEncoder

                encoder = PipelineEncoder(model_path, device=str(device), dtype=encode_dtype,
                                           max_sequence_length=max_sequence_length)
            from twinflow.data.encode import pad_prompts

            self.cond = {k: v.cpu() for k, v in pad_prompts(encoder.encode_prompts([p for p, _ in self.rows])).items()}
            if probe_prompts:
                self.probe_cond = {k: v.cpu() for k, v in pad_prompts(encoder.encode_prompts(probe_prompts)).items()}
            self.vae = encoder.pipe.vae
            if own:  # the text encoder (7B for Qwen-Image) is not needed any more
                encoder.pipe.text_encoder = None
                del encoder
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if zero3 and world > 1:
            import torch.distributed as dist

            box = [self.cond, self.probe_cond]
            dist.broadcast_object_list(box, src=0)
            self.cond, self.probe_cond = box

    def _inputs(self, velocity: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The fixed noise (one seed per row) and the rows' prompt condition, on the device."""
        channels = self.backbone.latent_channels(velocity.transformer.config)
        h, w = self.latent_hw
        cond = {k: v.to(self.device) for k, v in self.cond.items()}
        noise = torch.stack([torch.randn((channels, h, w), generator=torch.Generator().manual_seed(seed))
                             for _, seed in self.rows]).to(self.device)
        return noise, cond

    def _generators(self) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(10_000 + seed) for _, seed in self.rows]

    @torch.no_grad()
    def render_base(self, velocity: torch.nn.Module) -> None:
        """Keep the ``base_nfe`` columns of the model as it is now (call before any training step)."""
        if not self.active or not self.settings.base_nfe:
            return
        noise, cond = self._inputs(velocity)
        was_training = velocity.training
        velocity.eval()
        try:
            latents = [sample(velocity, noise, cond, ode(n), model_dtype=velocity.compute_dtype)
                       for n in self.settings.base_nfe]
        finally:
            velocity.train(was_training)
        if self.rank == 0:
            decode_latents = self.backbone.decode_latents
            self.base_columns = [decode_latents(self.vae, x).cpu() for x in latents]

    @torch.no_grad()
    def probe_images(self, velocity: torch.nn.Module, sampler, per_prompt: int) -> torch.Tensor | None:
        """``per_prompt`` images of each probe prompt ([P·per_prompt, 3, H, W] in [0, 1], prompt-major),
        from fixed seeds; rank 0 (None elsewhere); every rank must call it under ZeRO-3."""
        if not self.active:
            return None
        channels = self.backbone.latent_channels(velocity.transformer.config)
        h, w = self.latent_hw
        n_prompts = next(iter(self.probe_cond.values())).shape[0]
        rows = torch.arange(n_prompts).repeat_interleave(per_prompt)
        cond = {k: v[rows].to(self.device) for k, v in self.probe_cond.items()}
        seeds = [200_000 + i for i in range(len(rows))]
        noise = torch.stack([torch.randn((channels, h, w), generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(self.device)
        gens = [torch.Generator(device=self.device).manual_seed(s + 1) for s in seeds]
        was_training = velocity.training
        velocity.eval()
        try:
            x = sample(velocity, noise, cond, sampler, generator=gens, model_dtype=velocity.compute_dtype)
        finally:
            velocity.train(was_training)
        if self.rank != 0:
            return None
        decode_latents = self.backbone.decode_latents
        return torch.cat([decode_latents(self.vae, x[i:i + 256]).cpu() for i in range(0, len(x), 256)])

    @torch.no_grad()
    def render(self, velocity: torch.nn.Module):
        """The grid as a PIL image on rank 0 (None elsewhere); every rank must call it under ZeRO-3."""
        if not self.active:
            return None
        noise, cond = self._inputs(velocity)
        columns = []
        was_training = velocity.training
        velocity.eval()
        make = ode if self.settings.sampler == "ode" else few_step
        try:
            for nfe in self.settings.nfe:
                columns.append(sample(velocity, noise, cond, make(nfe), generator=self._generators(),
                                      model_dtype=velocity.compute_dtype))
        finally:
            velocity.train(was_training)
        if self.rank != 0:
            return None
        decode_latents = self.backbone.decode_latents
        images = [decode_latents(self.vae, x).cpu() for x in columns]  # per column: [rows, 3, H, W] in [0, 1]
        labels = [f"{n} NFE" for n in self.settings.nfe]
        if self.base_columns:
            images = self.base_columns + images
            labels = [f"base {n}" for n in self.settings.base_nfe] + [f"ours {n}" for n in self.settings.nfe]
        return compose_grid(images, labels)


    @torch.no_grad()
    def nfe_gap(self, velocity: torch.nn.Module, reference_nfe: int) -> dict[str, float]:
        """probe.kind nfe_gap (train/config.py ProbeSettings) on rank 0 ({} elsewhere); every rank must
        call it under ZeRO-3. Both samples start from the grid's noise; non-finite latents make the row
        count as the largest gap the clamped range allows, so a diverged model never scores well."""
        if not self.active:
            return {}
        noise, cond = self._inputs(velocity)
        was_training = velocity.training
        velocity.eval()
        try:
            one = sample(velocity, noise, cond, few_step(1), generator=self._generators(),
                         model_dtype=velocity.compute_dtype)
            ref = sample(velocity, noise, cond, ode(reference_nfe), model_dtype=velocity.compute_dtype)
        finally:
            velocity.train(was_training)
        if self.rank != 0:
            return {}
        return nfe_gap_metrics(one, ref)


GAP_LIMIT = 10.0
"""Normalised VAE latents are ~N(0, 1): beyond ±10 a latent decodes to garbage whatever its value."""


def nfe_gap_metrics(one: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per-row MSE between clamped latents, averaged; rows with a non-finite value score (2·GAP_LIMIT)²."""
    dims = tuple(range(1, one.dim()))
    bad = ~(torch.isfinite(one).flatten(1).all(1) & torch.isfinite(ref).flatten(1).all(1))
    a = torch.nan_to_num(one.float(), nan=0.0).clamp(-GAP_LIMIT, GAP_LIMIT)
    b = torch.nan_to_num(ref.float(), nan=0.0).clamp(-GAP_LIMIT, GAP_LIMIT)
    per_row = ((a - b) ** 2).mean(dim=dims)
    per_row = torch.where(bad, torch.full_like(per_row, (2 * GAP_LIMIT) ** 2), per_row)
    return {"nfe_gap_mse": float(per_row.mean()), "nfe_gap_nonfinite": float(bad.float().mean())}


MIN_TILE_PX = 64
"""Tiles smaller than this are enlarged (nearest neighbour) so the column labels fit and digits show."""


def compose_grid(columns: list[torch.Tensor], labels: list[str]) -> Any:
    from PIL import Image, ImageDraw

    n_rows, _, height, width = columns[0].shape
    scale = max(1, -(-MIN_TILE_PX // width))
    th, tw = height * scale, width * scale
    grid = Image.new("RGB", (tw * len(columns), HEADER_PX + th * n_rows), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, (col, label) in enumerate(zip(columns, labels)):
        draw.text((c * tw + 2, 1), label, fill=(0, 0, 0))
        for r in range(n_rows):
            arr = (col[r].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(arr)
            if scale > 1:
                tile = tile.resize((tw, th), Image.Resampling.NEAREST)
            grid.paste(tile, (c * tw, HEADER_PX + r * th))
    return grid
