"""LoRA for the TwinFlow Qwen-Image transformer, and the LoRA teachers (docs/METHOD.md §12, §16).

Targets are the reference's Qwen-Image list (attention q/k/v/out of both streams, both MLPs,
and the pretrained timestep embedder's two linears), PEFT ``init_lora_weights="gaussian"``, LoRA
weights in fp32 next to a frozen (bf16) base.

Design choice, E2 (``time_text_embed_2``): it is *not* LoRA'd, it is fully trainable. The
reference's LoRA recipe has no E2 at all (it feeds the single scalar t − r/2, docs/METHOD.md §17,
issue #32); we keep the full-parameter rule temb = E1(t) + (t − r)·E2(r) in both modes. E2 starts
as a copy of E1 but must learn a new function (an embedding of the target time scaled by t − r);
a low-rank update of a frozen copy would restrict exactly the part that has no pretrained
solution, and E2 is small (two linears, ~10 M parameters for 20B, ≈0.05 %). The suffix targets
``timestep_embedder.linear_{1,2}`` would also match E2's linears, so E2 is passed to PEFT as
``exclude_modules``; E1 keeps its LoRA as in the reference.

Teachers (method/teacher.py protocol):
  LoraEmaTeacher     a second adapter "ema" in the same model + an EMA copy of E2; velocity()
                     switches to it under no_grad; update() lerps default → ema with the
                     reference warm-up of method.teacher.EmaDecay (first update copies, then
                     d ← d + (1 − d)(d* − d)/2).
  LoraFrozenTeacher  adapters disabled + the initial E2: the pretrained model (CFG teacher only;
                     RCGM rollouts use the online model, ``rollout_uses_online``).
Adapter switching goes through ``active_adapter``, which restores the active adapter *and* every
``requires_grad`` flag afterwards (PEFT's set_adapter flips them).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from twinflow.config.errors import ConfigError, require
from twinflow.dtypes import DTYPE_NAMES, torch_dtype
from twinflow.method.teacher import EmaDecay, SelfTeacher, Teacher, make_teacher
from twinflow.models.target_time import E2_NAME as _E2  # one name in every family

# docs/METHOD.md §16 (reference: src/steerers/qwenimage/sft_ddp_lora.py): PEFT suffix names in diffusers' module tree.
QWEN_IMAGE_LORA_TARGETS: tuple[str, ...] = (
    "to_k", "to_q", "to_v", "to_out.0",
    "add_k_proj", "add_q_proj", "add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    "timestep_embedder.linear_1", "timestep_embedder.linear_2",
)
DEFAULT_ADAPTER = "default"
EMA_ADAPTER = "ema"
FAKE_ADAPTER = "fake"
"""DMD2 / VSD's fake score in LoRA mode: a second trained adapter on the one base (method/dmd.py)."""


@dataclass
class LoraSettings:
    rank: int = 64
    alpha: float = 64.0
    targets: list[str] = field(default_factory=list)
    """PEFT suffix names; each must match at least one linear layer. Empty: the model family's default
    targets (``default_lora_targets`` of models/<family>.py; Qwen-Image: QWEN_IMAGE_LORA_TARGETS)."""
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the LoRA weights and of E2 (fp32 master weights next to a bf16 base)."""

    def for_transformer(self, transformer: nn.Module) -> "LoraSettings":
        """These settings with empty targets replaced by the transformer's family default."""
        if self.targets:
            return self
        from dataclasses import replace

        from twinflow.models.families import backbone_for_transformer_class

        family = backbone_for_transformer_class(type(transformer).__name__)
        return replace(self, targets=list(family.default_lora_targets))

    def validate(self, path: str = "model.lora") -> None:
        require(self.rank >= 1, f"{path}.rank", f"must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"{path}.alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.dtype in DTYPE_NAMES, f"{path}.dtype", f"must be one of {', '.join(DTYPE_NAMES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


# ---------------------------------------------------------------------------
# adding adapters
# ---------------------------------------------------------------------------


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(transformer: nn.Module, targets: list[str] | tuple[str, ...],
                    path: str = "model.lora.targets") -> dict[str, list[str]]:
    """target -> the linear layers it matches (E2 excluded); ConfigError for a target matching none."""
    linears = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and not n.startswith(_E2 + ".")]
    found = {t: [n for n in linears if _matches(n, t)] for t in targets}
    for t, names in found.items():
        if not names:
            examples = sorted({n.rsplit(".", 1)[-1] for n in linears})[:6]
            raise ConfigError(f"{path}: {t!r} matches no linear layer of {type(transformer).__name__}; use "
                              f"suffixes of its module names such as {', '.join(examples)}")
    return found


def add_lora(transformer: nn.Module, settings: LoraSettings, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Freeze the base, add a PEFT LoRA adapter, make it and E2 trainable in ``settings.dtype``."""
    from peft import LoraConfig

    settings = settings.for_transformer(transformer)
    settings.validate()
    resolve_targets(transformer, settings.targets)
    # E2's linears share the suffixes timestep_embedder.linear_{1,2}; keep them out of PEFT.
    exclude = [n for n, m in transformer.named_modules()
               if n.startswith(_E2 + ".") and isinstance(m, nn.Linear) and any(_matches(n, t) for t in settings.targets)]
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        init_lora_weights="gaussian", target_modules=list(settings.targets),
                        exclude_modules=exclude or None)
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=adapter_name)
    dtype = settings.torch_dtype
    for name, p in transformer.named_parameters():
        if f".{adapter_name}." in name and "lora_" in name:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
    e2 = getattr(transformer, _E2, None)
    if e2 is not None:
        e2.to(dtype).requires_grad_(True)


def add_ema_adapter(transformer: nn.Module, source: str = DEFAULT_ADAPTER, name: str = EMA_ADAPTER) -> None:
    """Add adapter ``name`` with ``source``'s config, copy ``source``'s weights into it, freeze it,
    and leave ``source`` active (diffusers' add_adapter activates the new one)."""
    if source not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"no LoRA adapter {source!r} to shadow; call add_lora first")
    config = copy.deepcopy(transformer.peft_config[source])
    with _restore_requires_grad(transformer), warnings.catch_warnings():
        # PEFT warns that a second adapter is being added: that is the point here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=name)
        transformer.set_adapter(source)
    with torch.no_grad():
        for src, dst in _adapter_pairs(transformer, source, name):
            dst.data = src.detach().clone().to(src.dtype)
            dst.requires_grad_(False)


def _adapter_pairs(transformer: nn.Module, source: str, target: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    params = dict(transformer.named_parameters())
    pairs = []
    for name, p in params.items():
        if "lora_" in name and f".{source}." in name:
            other = name.replace(f".{source}.", f".{target}.")
            if other not in params:
                raise ValueError(f"adapter {target!r} has no counterpart of {name}")
            pairs.append((p, params[other]))
    if not pairs:
        raise ValueError(f"adapter {source!r} has no LoRA parameters")
    return pairs


def is_lora(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "peft_config", None))


@contextlib.contextmanager
def _restore_requires_grad(module: nn.Module):
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def active_adapter(transformer: nn.Module, name: str | None):
    """Evaluate with adapter ``name`` (None: all adapters off, the base model) inside the block.

    Restores the previously active adapters, the enabled state and all requires_grad flags.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no LoRA layers")
    previous = [(m, list(m.active_adapters), m.disable_adapters) for m in layers]
    with _restore_requires_grad(transformer):
        try:
            for m in layers:
                if name is None:
                    m.enable_adapters(False)
                else:
                    m.set_adapter(name)
                    m.enable_adapters(True)
            yield
        finally:
            for m, names, disabled in previous:
                m.set_adapter(names)
                m.enable_adapters(not disabled)


class AdapterVelocity(nn.Module):
    """A velocity evaluated with one LoRA adapter active (None: the base, every adapter off)."""

    def __init__(self, velocity: nn.Module, transformer: nn.Module, adapter: str | None):
        super().__init__()
        self.velocity, self.adapter = velocity, adapter
        self._transformer = [transformer]  # not a submodule: the velocity already holds it

    def forward(self, x, t, r, cond):
        with active_adapter(self._transformer[0], self.adapter):
            return self.velocity(x, t, r, cond)


def fake_adapter_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """The "fake" adapter's LoRA weights by name."""
    return {n: p for n, p in transformer.named_parameters() if f".{FAKE_ADAPTER}." in n and "lora_" in n}


def add_fake_adapter(transformer: nn.Module) -> list[nn.Parameter]:
    """DMD2 / VSD in LoRA mode: the "fake" adapter, a frozen copy of the student's (trained only inside
    ``fake_adapter_training``); returns its LoRA parameters."""
    if FAKE_ADAPTER not in getattr(transformer, "peft_config", {}):
        add_ema_adapter(transformer, name=FAKE_ADAPTER)
    return list(fake_adapter_parameters(transformer).values())


@contextlib.contextmanager
def fake_adapter_training(transformer: nn.Module):
    """The fake adapter active and the *only* trainable weights inside the block (the student's adapter and
    E2 frozen), so a backward there touches no student gradient, nor any hook DeepSpeed put on one."""
    with active_adapter(transformer, FAKE_ADAPTER):
        fake = {id(p) for p in fake_adapter_parameters(transformer).values()}
        for p in transformer.parameters():
            p.requires_grad_(id(p) in fake)
        yield


# ---------------------------------------------------------------------------
# saving, loading, merging
# ---------------------------------------------------------------------------


def lora_state_dict(transformer: nn.Module, adapter_name: str = DEFAULT_ADAPTER,
                    target_embedder: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """PEFT state dict of one adapter (keys without the adapter name) plus E2's weights.

    ``target_embedder`` replaces the model's E2 (the LoRA-EMA teacher's copy for "ema").
    """
    from peft import get_peft_model_state_dict

    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}
    e2 = target_embedder if target_embedder is not None else getattr(transformer, _E2, None)
    if e2 is not None:
        state.update({f"{_E2}.{k}": v.detach().clone() for k, v in e2.state_dict().items()})
    return state


def load_lora_state_dict(transformer: nn.Module, state: dict[str, torch.Tensor],
                         adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Inverse of ``lora_state_dict`` into an existing adapter of the same shape (strict)."""
    from peft import set_peft_model_state_dict

    e2_state = {k[len(_E2) + 1:]: v for k, v in state.items() if k.startswith(_E2 + ".")}
    lora_state = {k: v for k, v in state.items() if not k.startswith(_E2 + ".")}
    result = set_peft_model_state_dict(transformer, lora_state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"LoRA state has keys the model lacks, e.g. {unexpected[:3]}")
    if e2_state:
        with torch.no_grad():
            getattr(transformer, _E2).load_state_dict(e2_state)


@torch.no_grad()
def merge_lora(transformer: nn.Module, adapter_name: str = DEFAULT_ADAPTER,
               target_embedder: nn.Module | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold adapter ``adapter_name`` into the base weights and drop all PEFT layers, in place.

    The result is a plain ``TwinFlowQwenImageTransformer2DModel`` (``save_pretrained``-able); E2 is
    taken from ``target_embedder`` when given (the EMA copy for "ema"). ``dtype`` casts everything.
    """
    if not is_lora(transformer):
        raise ValueError("the model has no LoRA adapter to merge")
    if target_embedder is not None:
        getattr(transformer, _E2).load_state_dict(target_embedder.state_dict())
    with _restore_requires_grad(transformer):
        transformer.set_adapter(adapter_name)
    transformer.fuse_lora(adapter_names=[adapter_name])
    transformer.unload_lora()
    if dtype is not None:
        transformer.to(dtype)
    transformer.requires_grad_(False)
    return transformer


# ---------------------------------------------------------------------------
# teachers
# ---------------------------------------------------------------------------


class LoraEmaTeacher(EmaDecay):
    """EMA teacher held in the adapter "ema" of the online model, plus an EMA copy of E2 (decay and its
    warm-up: method.teacher.EmaDecay, as for module copies)."""

    rollout_uses_online = False

    def __init__(self, velocity: nn.Module, decay: float, warmup: bool = True, source: str = DEFAULT_ADAPTER,
                 adapter: str = EMA_ADAPTER):
        transformer = velocity.transformer
        if adapter not in getattr(transformer, "peft_config", {}):
            raise ConfigError(f"model.ema: the LoRA-EMA teacher needs the {adapter!r} adapter; set model.ema: true "
                              "(or load_twinflow_transformer(..., ema_adapter=True))")
        self.velocity_model = velocity
        self.transformer = transformer
        self.adapter = adapter
        self.pairs = _adapter_pairs(transformer, source, adapter)
        if any(hasattr(p, "ds_id") for pair in self.pairs for p in pair):
            raise ValueError("the LoRA-EMA teacher needs whole parameters (DDP or ZeRO-1/2), not ZeRO-3 partitions")
        e2 = getattr(transformer, _E2, None)
        self.e2 = copy.deepcopy(e2).requires_grad_(False) if e2 is not None else None
        super().__init__(decay, warmup)

    @torch.no_grad()
    def velocity(self, x, t, r, cond):
        with active_adapter(self.transformer, self.adapter), self.transformer.target_embedder(self.e2):
            return self.velocity_model(x, t, r, cond)

    @torch.no_grad()
    def update(self, online: nn.Module | None = None) -> None:
        """ema ← lerp(ema, default, 1 − d); then d ← d + (1 − d)(d* − d)/2 (first call copies)."""
        d = self.current_decay
        dst = [e for _, e in self.pairs]
        src = [s.detach().to(e.dtype) for s, e in self.pairs]
        if self.e2 is not None:
            online_e2 = getattr(self.transformer, _E2)
            dst += list(self.e2.parameters())
            src += [p.detach().to(q.dtype) for p, q in zip(online_e2.parameters(), self.e2.parameters())]
        torch._foreach_lerp_(dst, src, 1.0 - d)
        self._advance()

    def state_dict(self) -> dict:
        return {"ema": lora_state_dict(self.transformer, self.adapter, target_embedder=self.e2),
                **self._decay_state()}

    def load_state_dict(self, state: dict) -> None:
        ema = dict(state["ema"])
        e2_state = {k[len(_E2) + 1:]: v for k, v in ema.items() if k.startswith(_E2 + ".")}
        load_lora_state_dict(self.transformer, {k: v for k, v in ema.items() if not k.startswith(_E2 + ".")},
                             self.adapter)
        if self.e2 is not None and e2_state:
            self.e2.load_state_dict(e2_state)
        self._load_decay_state(state)


class LoraFrozenTeacher:
    """The model as it started: adapters off (base weights) and the initial E2."""

    rollout_uses_online = True

    def __init__(self, velocity: nn.Module):
        self.velocity_model = velocity
        self.transformer = velocity.transformer
        e2 = getattr(self.transformer, _E2, None)
        self.e2 = copy.deepcopy(e2).requires_grad_(False) if e2 is not None else None

    @torch.no_grad()
    def velocity(self, x, t, r, cond):
        with active_adapter(self.transformer, None), self.transformer.target_embedder(self.e2):
            return self.velocity_model(x, t, r, cond)

    def update(self, online: nn.Module | None = None) -> None:
        pass


def make_qwen_teacher(mode: str, velocity: nn.Module, ema_decay: float = 0.99) -> Teacher:
    """f̄ for a ``QwenImageVelocity``: LoRA models get the adapter teachers, full models the
    module-copy ones of method/teacher.py (an EMA of 20B is a second 20B copy: memory!)."""
    if mode == "self":
        return SelfTeacher(velocity)
    if is_lora(velocity.transformer):
        if mode == "ema":
            return LoraEmaTeacher(velocity, ema_decay)
        if mode == "frozen":
            return LoraFrozenTeacher(velocity)
        raise ValueError(f"unknown teacher mode {mode!r}; use self, ema or frozen")
    return make_teacher(mode, velocity, ema_decay)
