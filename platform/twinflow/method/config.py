"""The TwinFlow objective's config, and the presets that make FM and RCGM-only of it.

Plain flow matching and RCGM-only are *configurations* of the one objective, not separate
code paths:
  fm()        one block (near-diagonal with r = t), l2 loss, no time weight, no clipping,
              no enhancement: exactly  mean_i ‖F(x_t, t, t) − (z − x)‖² .
  rcgm()      the reference's "RCGM in practice": one-step + near-diagonal + any-step rows
              1:1:1, no fake rows, no rectification.
  twinflow()  λ-mix (default λ = 1/3), rectification coefficient 0.5, the production settings.
  twinflow_unbiased()  twinflow() with near-diagonal rows on l2 without the clip and the tutorial's
              real-velocity term (UNBIASED): the loss ablation's winner on both study datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from twinflow.config.errors import require
from twinflow.method.blocks import BLOCK_NAMES, Block, BlockWeights, weights_from_lambda

LOSSES = ("barron", "l2")


@dataclass
class BlockLoss:
    """One block's loss settings, overriding the objective-wide ones (docs/METHOD.md §11)."""

    loss: Literal["barron", "l2"] | None = None
    """Per-row loss of this block's rows (one-step rows: also their L_rectify); None: ``twinflow.loss``."""
    clip: bool = True
    """Clip this block's RCGM residual Φ at ``twinflow.rcgm_clip`` (off: the raw residual; a
    near-diagonal row with t − r < δ then regresses on v itself). Fake rows have no RCGM target."""

    def validate(self, path: str) -> None:
        require(self.loss is None or self.loss in LOSSES, f"{path}.loss",
                f"must be one of {', '.join(LOSSES)} or null (twinflow.loss), got {self.loss!r}")


@dataclass
class BlockLosses:
    """``twinflow.block_loss.<block>.{loss, clip}``; the defaults are the released recipe (Barron, clipped)."""

    one_step: BlockLoss = field(default_factory=BlockLoss)
    near_diag: BlockLoss = field(default_factory=BlockLoss)
    any_step: BlockLoss = field(default_factory=BlockLoss)
    fake: BlockLoss = field(default_factory=BlockLoss)

    def of(self, block: Block) -> BlockLoss:
        return getattr(self, BLOCK_NAMES[block])

    def validate(self, path: str = "twinflow.block_loss") -> None:
        for name in ("one_step", "near_diag", "any_step", "fake"):
            getattr(self, name).validate(f"{path}.{name}")


@dataclass
class TwinFlowConfig:
    # --- in-batch mix (blocks.py) -------------------------------------------------------
    lam: float = 1 / 3
    """Share of the global batch for L_TwinFlow (one-step + fake rows, split equally)."""
    block_weights: BlockWeights | None = None
    """Explicit shares {one_step, near_diag, any_step, fake}; when set, ``lam`` is ignored."""

    # --- time sampling (docs/METHOD.md §5) ------------------------------------------------
    time_dist: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """t ~ Beta(a, b)·scale, clamped to [0, 1]; (1, 1, 1) is U(0, 1)."""
    near_diag_ratio: float = 0.05
    """Near-diagonal rows draw r ∈ [(1 − ratio)·t, t]; 0 gives r = t exactly."""
    any_step_ratio: float = 1.0
    """Any-step rows draw r = t − U·ratio·t (the reference's consistc_ratio)."""

    # --- L_base: RCGM target (docs/METHOD.md §8) ------------------------------------------
    rcgm_order: int = 2
    """N sub-steps of the teacher rollout from t − δ to r (1 or 2)."""
    rcgm_delta: float = 0.01
    """δ: Euler step on the target velocity; rows with t − r < δ fall back to flow matching."""
    rcgm_clip: float | None = 1.0
    """Element-wise clip of the residual Φ; None disables it."""
    one_step_rcgm: bool = True
    """One-step rows also carry the RCGM target at (1, 0), as in the reference."""

    # --- condition dropout (classifier-free guidance training) -----------------------------
    cond_dropout: float = 0.0
    """Share of real rows whose condition is replaced by the unconditional one, so the model also
    learns f(x | ∅), which CFG (and the enhancement below) needs; 0.1 is the usual pretraining value."""

    # --- CFG enhancement of the target (docs/METHOD.md §7) --------------------------------
    enhance_ratio: float = 0.8
    """w_e (0.8 for self/EMA teachers, 4.0 for a frozen one): v ← v + w_e·(f̄(t,t|c) − f̄(t,t|∅)) on real rows with t strictly inside enhance_range."""
    enhance_range: tuple[float, float] = (0.0, 1.0)

    # --- L_TwinFlow (docs/METHOD.md §9, §10) -----------------------------------------------
    rectify_coef: float = 0.5
    """dmc: weight of L_rectify on the one-step rows; 0 turns it off."""
    rectify_clip: float | None = 1.0
    """Element-wise clip of Δv = F(y,−τ,−τ) − F(y,τ,τ)."""

    # --- per-sample loss and weighting ------------------------------------------------------
    loss: Literal["barron", "l2"] = "barron"
    """The per-row loss of every block unless ``block_loss`` says otherwise."""
    barron_alpha: float = 1.0
    barron_c: float = 1e-3
    block_loss: BlockLosses = field(default_factory=BlockLosses)
    """Per block: the loss kind and whether its RCGM residual is clipped (docs/METHOD.md §11)."""
    time_weight: Literal["tan", "none"] = "tan"
    real_velocity_weight: float = 0.0
    """Weight of the released MNIST tutorial's optional real-velocity term w·ℓ(F(x_t, t, t), v) on every
    real row: the velocity on the diagonal regressed on v itself (the enhanced v when enhancement is on),
    never clipped, no time weight. Its rows join the one pass with gradient (a larger batch, not a second
    call); 0 (the released production code) turns it off (docs/METHOD.md §11)."""
    real_velocity_loss: Literal["barron", "l2"] = "l2"
    """ℓ of the real-velocity term; the tutorial's plain MSE by default."""

    # --- teacher f̄ for enhancement and rollouts (docs/METHOD.md §12) ----------------------
    teacher: Literal["self", "ema", "frozen"] = "self"
    """self: the online model without grad; ema: an EMA copy; frozen: the initial weights
    (CFG teacher only; rollouts then use the online model, as the reference does)."""
    teacher_ema_decay: float = 0.99
    """Target decay of the EMA teacher; warms up from 0 (first update copies)."""

    def weights(self) -> BlockWeights:
        return self.block_weights if self.block_weights is not None else weights_from_lambda(self.lam)

    def validate(self, path: str = "twinflow") -> None:
        p = path or "twinflow"
        require(0.0 <= self.lam <= 1.0, f"{p}.lam", f"must be in [0, 1], got {self.lam}")
        require(self.rcgm_order in (1, 2), f"{p}.rcgm_order", f"must be 1 or 2, got {self.rcgm_order}")
        require(0 < self.rcgm_delta < 1, f"{p}.rcgm_delta", f"must be in (0, 1), got {self.rcgm_delta}")
        require(0 <= self.near_diag_ratio <= 1, f"{p}.near_diag_ratio", "must be in [0, 1]")
        require(0 <= self.any_step_ratio <= 1, f"{p}.any_step_ratio", "must be in [0, 1]")
        require(self.rectify_coef >= 0, f"{p}.rectify_coef", "must be >= 0")
        require(self.enhance_ratio >= 0, f"{p}.enhance_ratio", "must be >= 0")
        require(0 <= self.cond_dropout < 1, f"{p}.cond_dropout", f"must be in [0, 1), got {self.cond_dropout}")
        lo, hi = self.enhance_range
        require(0 <= lo < hi <= 1, f"{p}.enhance_range", f"must satisfy 0 <= lo < hi <= 1, got {self.enhance_range}")
        a, b, s = self.time_dist
        require(a > 0 and b > 0 and 0 < s <= 1, f"{p}.time_dist", "Beta(a, b)·scale needs a, b > 0 and 0 < scale <= 1")
        require(0 <= self.teacher_ema_decay <= 1, f"{p}.teacher_ema_decay", "must be in [0, 1]")
        require(self.loss in LOSSES, f"{p}.loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        require(self.real_velocity_weight >= 0, f"{p}.real_velocity_weight",
                f"must be >= 0 (0 turns the term off), got {self.real_velocity_weight}")
        self.block_loss.validate(f"{p}.block_loss")
        for name in ("rcgm_clip", "rectify_clip"):
            v = getattr(self, name)
            require(v is None or v > 0, f"{p}.{name}", "must be positive or null")
        if self.block_weights is not None:
            self.block_weights.validate(f"{p}.block_weights")


# ---------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------


def fm() -> TwinFlowConfig:
    """Plain flow matching: F(x_t, t, t) regressed on z − x with an unweighted MSE."""
    return TwinFlowConfig(block_weights=BlockWeights(0, 1, 0, 0), near_diag_ratio=0.0, rcgm_clip=None,
                          rectify_coef=0.0, enhance_ratio=0.0, loss="l2", time_weight="none")


def rcgm() -> TwinFlowConfig:
    """RCGM-only (the paper's ablation baseline): L_base on one-step/near-diag/any-step rows 1:1:1."""
    return TwinFlowConfig(block_weights=BlockWeights(1, 1, 1, 0), rectify_coef=0.0)


def twinflow(lam: float = 1 / 3) -> TwinFlowConfig:
    """TwinFlow: L_base + L_TwinFlow mixed by λ (1/3: the paper's reported best, the paper's λ being a share
    of the batch; the released code's fixed 1:1:1:1 mix is λ = 1/2 here)."""
    return TwinFlowConfig(lam=lam)


UNBIASED = {"block_loss": {"near_diag": {"loss": "l2", "clip": False}}, "real_velocity_weight": 1.0}
"""What ``twinflow_unbiased`` changes, as ``twinflow:`` overrides (the mini paper's run uses this dict):
near-diagonal rows regress on E[v | x_t] (l2, unclipped) instead of a clipped geometric median, and every
real row also carries the unclipped flow-matching term ℓ(F(x_t, t, t), v) (docs/METHOD.md §11)."""


def unbiased(cfg: TwinFlowConfig) -> TwinFlowConfig:
    """``cfg`` with the UNBIASED changes applied in place (and returned)."""
    cfg.block_loss.near_diag = BlockLoss(**UNBIASED["block_loss"]["near_diag"])
    cfg.real_velocity_weight = UNBIASED["real_velocity_weight"]
    return cfg


def twinflow_unbiased(lam: float = 1 / 3) -> TwinFlowConfig:
    """TwinFlow without the robust loss's bias on multimodal data: in the study's 3-seed loss ablation it
    beat the released losses on both datasets beyond the training-seed spread (README, "The loss
    ablation"); the released recipe stays the default."""
    return unbiased(twinflow(lam))


PRESETS = {"fm": fm, "rcgm": rcgm, "twinflow": twinflow, "twinflow_unbiased": twinflow_unbiased}
