"""Measured memory and forward counts, to check the planner against real runs (CPU or CUDA).

How memory is measured
  CUDA   torch.cuda.max_memory_allocated() above the allocation at entry (and the reserved peak):
         the caching allocator's own high-water mark.
  CPU    PyTorch has no CPU allocator statistics, so the profiler is used as one: with
         ``profile_memory=True`` every allocation and free of c10's CPU allocator is reported
         together with the running total of bytes allocated *since profiling started*
         (``total_allocated`` of each allocation event). Its maximum is the exact high-water
         mark of tensor memory above what existed at entry — kernel temporaries included,
         interpreter and library heap excluded (which is what a GPU's allocator would see too).
  Static bytes (weights, gradients, optimizer state) are counted exactly by walking the unique
  storages of the module and optimizer (``tensor_bytes``).

``CountingVelocity`` wraps F(x_t, t, r, cond) and records every call's row count and whether it
ran with gradient: the measured forward schedule of one objective call.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn


# ---------------------------------------------------------------------------
# static bytes
# ---------------------------------------------------------------------------


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def tensor_bytes(module: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 grads: bool = True) -> dict[str, int]:
    """Bytes held by parameters, buffers, gradients and optimizer state (unique storages)."""
    params = list(module.parameters()) if module is not None else []
    out = {"params": sum(_storages(params).values()),
           "buffers": sum(_storages(module.buffers()).values()) if module is not None else 0,
           "grads": sum(_storages(p.grad for p in params if p.grad is not None).values()) if grads else 0,
           "optimizer": 0}
    if optimizer is not None:
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        out["optimizer"] = sum(_storages(state).values())
    return out


# ---------------------------------------------------------------------------
# peak measurement
# ---------------------------------------------------------------------------


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` / ``m.end_bytes`` (above entry).

    ``with m.phase("backward"): ...`` inside the block also records that phase's peak and its
    level at exit in ``m.phases[name] = (peak, end)``. On CPU only allocations made inside the
    region are counted, and so are their frees: tensors that existed at entry (weights,
    optimizer state) are not, even if freed inside — measure whole steps, not half of one.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.end_bytes = 0
        self.reserved_bytes: int | None = None
        self.phases: dict[str, tuple[int, int]] = {}
        self.method = ""
        self._prof = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
            self.method = "torch.profiler CPU allocator events (max total_allocated)"
        return self

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device) - self._base)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) - self._base
                self.phases[name] = (peak, torch.cuda.memory_allocated(self.device) - self._base)
                self.peak_bytes = max(self.peak_bytes, peak)
        else:
            with torch.profiler.record_function(_PHASE + name):
                yield

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device) - self._base)
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._base
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            return
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self.peak_bytes, self.end_bytes, self.phases = _profiler_summary(self._prof)


_PHASE = "twinflow.plan::"


def _profiler_summary(prof) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(max, last) running allocation total over the region, and per ``phase``: (max, last) inside it."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    ranges: dict[str, tuple[int, int]] = {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, int(e.extra_fields.total_allocated)))
        elif e.name.startswith(_PHASE):
            ranges[e.name[len(_PHASE):]] = (e.start_time_ns, e.end_time_ns)
        stack.extend(e.children)
    if not events:
        return 0, 0, {name: (0, 0) for name in ranges}
    events.sort()
    phases = {}
    for name, (start, end) in ranges.items():
        before = [tot for t, tot in events if t < start]
        inside = [tot for t, tot in events if start <= t <= end]
        level = before[-1] if before else 0
        phases[name] = (max(inside + [level]), (inside or [level])[-1])
    return max(tot for _, tot in events), events[-1][1], phases


# ---------------------------------------------------------------------------
# forward counting
# ---------------------------------------------------------------------------


class CountingVelocity(nn.Module):
    """F wrapper that logs (rows, grad) per call; ``calls`` is reset by ``reset()``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, bool]] = []

    def reset(self) -> None:
        self.calls = []

    def forward(self, x_t, t, r, cond):
        self.calls.append((int(x_t.shape[0]), torch.is_grad_enabled()))
        return self.inner(x_t, t, r, cond)

    def b_equivalents(self, batch: int) -> dict[str, float]:
        grad = sum(n for n, g in self.calls if g) / batch
        nograd = sum(n for n, g in self.calls if not g) / batch
        return {"grad_forwards": grad, "nograd_forwards": nograd, "calls": len(self.calls)}


# ---------------------------------------------------------------------------
# one training step of the objective
# ---------------------------------------------------------------------------


@dataclass
class StepResult:
    seconds: float
    peak_bytes: int | None = None
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Measured (peak, end) per phase of the step, above the step's start."""
    loss: float = float("nan")
    forwards: dict[str, float] = field(default_factory=dict)


def objective_step(velocity: nn.Module, objective: Any, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
                   cond: dict, block_ids: torch.Tensor, uncond: dict | None = None,
                   generator: torch.Generator | None = None, measure: bool = False) -> StepResult:
    """One optimizer step of ``objective`` on one micro-batch: forward(s), backward, AdamW, zero_grad.

    ``measure``: wrap the step in ``PeakMemory`` (the profiler on CPU: do not time such a step).
    """
    device = latents.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    counter = velocity if isinstance(velocity, CountingVelocity) else None
    if counter is not None:
        counter.reset()
    meter = PeakMemory(device) if measure else None
    sync()
    t0 = time.perf_counter()
    if meter is not None:
        meter.__enter__()
    phase = meter.phase if meter is not None else (lambda name: contextlib.nullcontext())
    try:
        with phase("objective (forwards)"):
            out = objective(velocity, latents, cond, block_ids, uncond=uncond, generator=generator)
        with phase("backward"):
            out.loss.backward()
        with phase("optimizer step"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        del out
    finally:
        if meter is not None:
            meter.__exit__(None, None, None)
    sync()
    seconds = time.perf_counter() - t0
    forwards = counter.b_equivalents(latents.shape[0]) if counter is not None else {}
    return StepResult(seconds=seconds, peak_bytes=meter.peak_bytes if meter else None,
                      phases=dict(meter.phases) if meter else {}, loss=loss, forwards=forwards)
