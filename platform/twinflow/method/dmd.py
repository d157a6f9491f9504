"""DMD2 and VSD: distribution matching with a trained fake score — the rivals TwinFlow does without.

Three networks share TwinFlow's velocity contract F(x_t, t, r, cond) (docs/METHOD.md §19):
  student  G(z) = z − F_s(z, 1, 0): a one-step generator (the trained model),
  real     the teacher's instantaneous velocity F_real(x_t, t, t), frozen (the pretrained base),
  fake     F_fake(x_t, t, t), trained by flow matching on the student's (detached) samples, so that
           it tracks the velocity field of the student's distribution.
One student step (two time scales): ``fake_updates`` flow-matching steps of the fake score on fresh
student samples, then the student step on the distribution-matching gradient at a noised sample
x_t = t·z' + (1 − t)·G(z):

  DMD2   ∇ₓ = (x̂_fake − x̂_real) / mean|G(z) − x̂_real|,   x̂ = x_t − t·F(x_t, t, t)  (data estimates)
  VSD    ∇ₓ = ε̂_real − ε̂_fake = (1 − t)·(F_real − F_fake),  ε̂ = x_t + (1 − t)·F     (noise estimates)

Both are (F_real − F_fake) with a positive per-row weight (t/mean|·| vs 1 − t): descending moves G(z)
toward where the real field points and away from where the student's own field points. The loss is
½‖G(z) − sg(G(z) − ∇ₓ)‖², whose gradient in G(z) is ∇ₓ. Real-score CFG (``guidance``) and DMD2's
optional regression onto teacher ODE samples (``regression_weight``) are included, and so is DMD2's GAN
term (``gan_weight``; both off by default, as in the DMD-distilled Qwen-Image-Lightning): a small
classifier head (``Discriminator``) on the fake score's last hidden state — the input of its output
layer, read by a forward pre-hook, so any velocity network that names its ``output_layer`` works — is
trained in every fake step to tell noised real latents (the batch) from noised student samples
(softplus losses, weight ``gan_head_weight``), and the student adds the non-saturating generator loss
softplus(−D(x_t)) on its own noised samples, through the fake score with its weights held fixed.
Memory: full mode holds student + fake + real (three copies); LoRA mode holds one base with a
"student" and a "fake" adapter and gets the real score with the adapters disabled (models/lora.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Literal

import torch
from torch import nn

from twinflow.config.errors import require
from twinflow.method.blocks import LossNorm
from twinflow.method.losses import per_sample_mse
from twinflow.method.objective import ObjectiveOutput, add_stat
from twinflow.method.path import expand_time, interpolate, velocity
from twinflow.method.rows import rand, randn_like
from twinflow.method.sampler import ode, sample
from twinflow.method.teacher import VelocityFn


@dataclass
class DMDConfig:
    """DMD2 (``weighting: dmd``) or VSD (``weighting: vsd``); defaults: DMD2's text-to-image recipe."""

    name: Literal["dmd2", "vsd"] = "dmd2"
    weighting: Literal["dmd", "vsd"] = "dmd"
    fake_updates: int = 5
    """Fake-score steps per student step (DMD2's two-time-scale rule: 5)."""
    fake_lr_scale: float = 1.0
    """The fake score's learning rate relative to the student's."""
    t_range: tuple[float, float] = (0.02, 0.98)
    """Noise levels the distribution-matching gradient is taken at, t ~ U(lo, hi)."""
    guidance: float = 1.0
    """CFG scale on the real score (1: none); needs an unconditional condition above 1."""
    regression_weight: float = 0.0
    """Weight of ‖G(z) − ODE_real(z)‖² (DMD's regression loss; costs ``regression_steps`` teacher calls)."""
    regression_steps: int = 16
    gan_weight: float = 0.0
    """Weight of the student's non-saturating GAN loss (0: no GAN term, no head). DMD2's text-to-image runs
    used 5e-3 with ``gan_head_weight`` 1e-2."""
    gan_head_weight: float = 1e-2
    """Weight of the head's classification loss in each fake-score step, beside the flow-matching loss."""

    def validate(self, path: str = "dmd") -> None:
        require(self.weighting in ("dmd", "vsd"), f"{path}.weighting", f"choose dmd or vsd, got {self.weighting!r}")
        require(self.fake_updates >= 1, f"{path}.fake_updates", "must be >= 1")
        require(self.fake_lr_scale > 0, f"{path}.fake_lr_scale", "must be positive")
        lo, hi = self.t_range
        require(0 < lo < hi < 1, f"{path}.t_range", f"need 0 < lo < hi < 1, got {self.t_range}")
        require(self.guidance >= 1, f"{path}.guidance", "must be >= 1 (1 = no guidance)")
        require(self.regression_weight >= 0, f"{path}.regression_weight", "must be >= 0")
        require(self.regression_steps >= 1, f"{path}.regression_steps", "must be >= 1")
        require(self.gan_weight >= 0, f"{path}.gan_weight", "must be >= 0 (0 = no GAN term)")
        require(self.gan_head_weight > 0, f"{path}.gan_head_weight", "must be positive")


def dmd2() -> DMDConfig:
    return DMDConfig()


def vsd() -> DMDConfig:
    """VSD (ProlificDreamer's variational score distillation) on the same machinery: ε-space difference, no
    per-sample normalisation, one fake step per student step, as the paper's "LoRA fake score" row."""
    return DMDConfig(name="vsd", weighting="vsd", fake_updates=1)


def one_step(student: VelocityFn, z: torch.Tensor, cond: Any) -> torch.Tensor:
    """G(z) = z − F_s(z, 1, 0)."""
    ones = torch.ones(z.shape[0], device=z.device)
    return z.float() - student(z, ones, torch.zeros_like(ones), cond).float()


def matching_gradient(x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_real: torch.Tensor,
                      v_fake: torch.Tensor, weighting: str) -> torch.Tensor:
    """∇ₓ of the distribution-matching loss at student samples x (all detached): see the module docstring."""
    if weighting == "vsd":
        return expand_time(1 - t, x) * (v_real - v_fake)
    x_real = x_t - expand_time(t, x_t) * v_real
    x_fake = x_t - expand_time(t, x_t) * v_fake
    scale = (x - x_real).abs().flatten(1).mean(1).clamp_min(1e-8)
    return (x_fake - x_real) / expand_time(scale, x)


def output_layer(net: nn.Module) -> nn.Module:
    """The layer that maps a velocity network's last hidden state to its output: ``net.output_layer``, or
    that of the network it wraps (``.transformer``, DDP's ``.module``)."""
    for candidate in (net, getattr(net, "transformer", None), getattr(net, "module", None)):
        layer = getattr(candidate, "output_layer", None) if candidate is not None else None
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError(f"dmd.gan_weight: the GAN head reads the fake score's last hidden state, but "
                     f"{type(net).__name__} names no output_layer; set gan_weight: 0 or give the model an "
                     f"output_layer property")


class Discriminator(nn.Module):
    """DMD2's GAN classifier sharing the fake score's trunk: the input of the fake network's output layer
    (captured by a forward pre-hook on every call of that network), mean-pooled over tokens, through
    LayerNorm → Linear → SiLU → Linear to one logit per row. Only the head's weights are its parameters;
    the fake score's own weights learn from the head's loss in the fake steps, as in DMD2."""

    def __init__(self, fake_net: nn.Module):
        super().__init__()
        layer = output_layer(fake_net)
        width = getattr(layer, "in_features", None)
        if not isinstance(width, int):
            raise ValueError(f"dmd.gan_weight: the fake score's output layer ({type(layer).__name__}) has no "
                             f"in_features; the GAN head needs a linear output layer")
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self.head.to(next(layer.parameters()).device)
        self.__dict__["_hidden"] = None  # plain attributes: the hook and what it saw are not state
        self.__dict__["_hook"] = layer.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.__dict__["_hidden"] = args[0]

    def logits(self) -> torch.Tensor:
        """Logits of the rows the fake network saw in its last call (taken once)."""
        h = self.__dict__["_hidden"]
        if h is None:
            raise RuntimeError("Discriminator.logits() needs a fake-score call first")
        self.__dict__["_hidden"] = None
        return self.head(h.float().reshape(h.shape[0], -1, h.shape[-1]).mean(1)).squeeze(1)

    def remove(self) -> None:
        self.__dict__["_hook"].remove()


class DMDObjective:
    """One student step of DMD2 / VSD, the fake score's updates included.

    The fake score is the objective's own state: ``fake`` (called with gradient in its own steps,
    possibly wrapped for data parallelism), ``fake_opt`` (its optimizer, stepped here) and
    ``fake_params`` (clipped to ``grad_clip``; default: ``fake.parameters()``). ``real`` is the frozen
    teacher velocity. ``fake_context`` (optional) is entered around each fake step's forward, backward
    and optimizer step — a LoRA model makes its "fake" adapter the active, trainable one there, so
    gradient checkpointing recomputes with it — and ``fake_eval`` (default ``fake``) scores student samples
    without gradient. ``reduce_grads`` (optional) averages the fake score's gradients over data-parallel
    ranks between its backward and its step (a trainer whose fake score is outside DDP / DeepSpeed); a
    fake step whose gradients are not finite afterwards is skipped (on every rank alike: the check follows
    the reduction) and counted in the ``fake_skipped`` stat. ``discriminator`` (needed when
    ``gan_weight`` > 0) is a ``Discriminator`` on the fake network; its parameters must be among
    ``fake_params`` (the fake optimizer trains them). ``fake_update`` (optional) replaces that whole torch
    update: a trainer whose fake score is its own DeepSpeed engine (ZeRO-3) passes a callable that takes the
    fake step's loss, runs the engine's backward and step (reduction, clipping and the non-finite check are
    the engine's) and returns whether the step was applied; ``fake_opt`` is then unused. The student loss is
    returned for the trainer to backpropagate and step.
    """

    def __init__(self, cfg: DMDConfig, real: VelocityFn, fake: VelocityFn, fake_opt: torch.optim.Optimizer | None,
                 fake_params: list[nn.Parameter] | None = None, grad_clip: float | None = 1.0,
                 fake_context: Callable[[], ContextManager] | None = None, fake_eval: VelocityFn | None = None,
                 reduce_grads: Callable[[list[nn.Parameter]], None] | None = None,
                 discriminator: Discriminator | None = None,
                 fake_update: Callable[[torch.Tensor], bool] | None = None):
        if fake_opt is None and fake_update is None:
            raise ValueError("the fake score needs an optimizer (fake_opt) or an update of its own (fake_update)")
        self.cfg, self.real, self.fake, self.fake_opt = cfg, real, fake, fake_opt
        self.fake_update = fake_update or self._torch_update
        self.fake_params = fake_params if fake_params is not None else list(fake.parameters())
        if cfg.gan_weight > 0:
            if discriminator is None:
                raise ValueError("dmd.gan_weight > 0 needs a Discriminator on the fake network (the trainer builds it)")
            owned = {id(p) for p in self.fake_params}
            if any(id(p) not in owned for p in discriminator.parameters()):
                raise ValueError("the Discriminator's parameters must be among fake_params (the fake optimizer's)")
        self.discriminator = discriminator if cfg.gan_weight > 0 else None
        self._head_losses: list[torch.Tensor] = []  # the head's loss per fake step of the current student step
        self.grad_clip = grad_clip
        self.fake_context = fake_context or contextlib.nullcontext
        self.fake_eval = fake_eval or fake
        self.reduce_grads = reduce_grads
        self.fake_skipped = 0
        """Fake-score steps skipped for non-finite gradients since the objective was built."""

    def fake_step(self, student: VelocityFn, like: torch.Tensor, cond: Any, generator: torch.Generator | None,
                  rows: int) -> torch.Tensor:
        """One flow-matching step of the fake score on detached student samples; returns its loss."""
        with torch.no_grad():
            x = one_step(student, randn_like(like.float(), generator).to(like.dtype), cond)
            z = randn_like(x, generator)
            t = rand(x.shape[0], generator, x.device)
            x_t = interpolate(x, z, t)
            v = velocity(x, z)
        with self.fake_context():
            per_row = per_sample_mse(self.fake(x_t.to(like.dtype), t, t, cond).float(), v)
            loss = per_row.sum() / rows
            if self.discriminator is not None:
                # the head's classification: this call's noised student samples are fake, the batch's
                # real latents noised to the same levels are real
                fake_logits = self.discriminator.logits()
                with torch.no_grad():
                    real_t = interpolate(like.float(), randn_like(like.float(), generator), t).to(like.dtype)
                self.fake(real_t, t, t, cond)
                real_logits = self.discriminator.logits()
                head = nn.functional.softplus(fake_logits) + nn.functional.softplus(-real_logits)
                loss = loss + self.cfg.gan_head_weight * head.sum() / rows
                self._head_losses.append(head.detach().mean())
            if not self.fake_update(loss):
                self.fake_skipped += 1
        return per_row.detach().mean()

    def _torch_update(self, loss: torch.Tensor) -> bool:
        """Backward, cross-rank mean (``reduce_grads``), clip and step of ``fake_opt``; False (nothing
        applied) when the gradient norm is not finite, on every rank alike since it follows the mean."""
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.reduce_grads is not None:
            self.reduce_grads(self.fake_params)
        grads = [p.grad for p in self.fake_params if p.grad is not None]
        # one total norm, from the clip when there is one (NaN / inf there: keep the fake score as it was)
        norm = (torch.nn.utils.clip_grad_norm_(self.fake_params, self.grad_clip) if self.grad_clip
                else torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
        applied = bool(torch.isfinite(norm))
        if applied:
            self.fake_opt.step()
        self.fake_opt.zero_grad(set_to_none=True)
        return applied

    def __call__(self, model: VelocityFn, x: torch.Tensor, cond: Any, block_ids: torch.Tensor | None = None, *,
                 uncond: Any = None, teacher: Any = None, model_nograd: VelocityFn | None = None,
                 generator: torch.Generator | None = None, norm: LossNorm | None = None) -> ObjectiveOutput:
        cfg, n, dev = self.cfg, x.shape[0], x.device
        raw = model_nograd or model
        rows = norm.rows if norm is not None else n
        if cfg.guidance > 1 and uncond is None:
            raise ValueError("dmd.guidance > 1 needs the unconditional condition (uncond)")
        stats: dict = {}
        skipped_before = self.fake_skipped
        self._head_losses = []
        fake_losses = [self.fake_step(raw, x, cond, generator, rows) for _ in range(cfg.fake_updates)]
        add_stat(stats, "loss/fake_score", torch.stack(fake_losses).sum(), len(fake_losses))
        add_stat(stats, "fake_skipped", torch.tensor(float(self.fake_skipped - skipped_before)), 1)
        if self.discriminator is not None:
            add_stat(stats, "loss/gan_head", torch.stack(self._head_losses).sum(), len(self._head_losses))

        z = randn_like(x.float(), generator)
        g = one_step(model, z.to(x.dtype), cond)
        with torch.no_grad():
            lo, hi = cfg.t_range
            t = lo + (hi - lo) * rand(n, generator, dev)
            eps = randn_like(g, generator)
            x_t = interpolate(g.detach(), eps, t)
            xt_in = x_t.to(x.dtype)
            v_real = self._real(xt_in, t, cond, uncond)
            v_fake = self.fake_eval(xt_in, t, t, cond).float()
            grad = matching_gradient(g.detach(), x_t, t, v_real, v_fake, cfg.weighting)
        per_row = 0.5 * (g - (g.detach() - grad)).pow(2).flatten(1).sum(1)
        loss = per_row.sum() / rows
        add_stat(stats, "loss/dm", per_row.detach().sum(), n)
        if cfg.regression_weight > 0:
            with torch.no_grad():
                target = sample(self.real, z.to(x.dtype), cond, ode(cfg.regression_steps))
            reg = per_sample_mse(g, target)
            loss = loss + cfg.regression_weight * reg.sum() / rows
            add_stat(stats, "loss/regression", reg.detach().sum(), n)
        if self.discriminator is not None:
            gan, surrogate = self._generator_gan(g, eps, t, cond, x.dtype)
            loss = loss + cfg.gan_weight * surrogate.sum() / rows
            add_stat(stats, "loss/gan", gan.sum(), n)
        add_stat(stats, "loss/total", loss.detach())
        return ObjectiveOutput(loss=loss, stats=stats)

    def _generator_gan(self, g: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Any,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's softplus(−D(x_t)) per row, and a per-row surrogate whose gradient in the student's
        samples g is exactly that loss's: ∂/∂x_t is taken by ``autograd.grad`` with x_t the only input, so the
        fake score and the head collect no gradient (and no flag changes under a checkpointed forward), then
        chained through x_t = t·ε + (1 − t)·g like the matching gradient."""
        x_t = interpolate(g.detach(), eps, t).to(dtype).requires_grad_(True)
        with torch.enable_grad():
            self.fake_eval(x_t, t, t, cond)
            per_row = nn.functional.softplus(-self.discriminator.logits())
            (grad,) = torch.autograd.grad(per_row.sum(), x_t)
        surrogate = (grad.float() * interpolate(g, eps, t)).flatten(1).sum(1)
        return per_row.detach(), surrogate - surrogate.detach() + per_row.detach()

    @torch.no_grad()
    def _real(self, x_t, t, cond, uncond) -> torch.Tensor:
        vc = self.real(x_t, t, t, cond).float()
        if self.cfg.guidance == 1.0:
            return vc
        vu = self.real(x_t, t, t, uncond).float()
        return vu + self.cfg.guidance * (vc - vu)
