"""Per-GPU memory of one TwinFlow training configuration: ``plan_memory(PlanInputs) -> MemoryPlan``.

The plan has two parts.

Static (alive for the whole step), per GPU:
  weights          bf16 base (+ fp32 LoRA and E2 in LoRA mode); ZeRO-3 divides by the GPU count,
                   parameter offload moves the partition to host RAM
  zero-3 gathered  the parameters ZeRO-3 has gathered at a time: the current and the prefetched
                   block plus the prefetch bucket, capped by stage3_max_live_parameters
  master weights   fp32 copy of trained 16-bit weights (mixed precision); none for fp32 LoRA
  optimizer        AdamW's two fp32 moments of every trained parameter (LoRA: adapters + E2 only,
                   the frozen base has none); ZeRO ≥ 1 divides master + moments by the GPU count,
                   optimizer offload moves them (and DeepSpeed's fp32 gradient copy) to host RAM
  gradients        one per trained parameter in its dtype; ZeRO ≥ 2 divides by the GPU count
  comm buffers     DeepSpeed's reduce/all-gather buckets (ZeRO-1/2 with overlap_comm ×4.5, DeepSpeed's
                   figure; ZeRO-3 reduce bucket ×2 with overlap_comm)
  teacher copy     self: nothing; EMA/frozen full model: a second set of weights; LoRA EMA: a
                   second adapter + an E2 copy; LoRA frozen: an E2 copy
  text encoder/VAE only when resident (bf16); the platform pre-caches both by default
  batch            latents, prompt embeddings (+ the uncond ones) and the objective's per-row tensors

Transient (one step's phases; the peak is the largest), from activations.py and forwards.py:
  fake generation  the no-grad forward of the fake rows, before anything is saved
  grad forward     the activations kept for backward (all of them, or each block's input under
                   gradient checkpointing) plus the largest in-block working set
  no-grad passes   TwinFlow's extras: the CFG teacher, the RCGM rollout and the rectification run
                   *after* the grad forward, so its saved activations are alive under them; the
                   largest single call's working set counts
  backward         saved activations + one block's gradient tensors (+ that block's recompute
                   under checkpointing); without DeepSpeed/DDP buffers gradients grow here
  optimizer step   torch AdamW's foreach temporaries (one fp32 copy of the local trained params)

``gpu_total`` adds the CUDA context. ``fits(gpu)`` asks for ``margin`` headroom on top.
``dmd`` (``PlanInputs.method``) plans the same run the way DMD-style distillation would need it:
a second trained network (the fake score, with its own gradients and optimizer state) and a frozen
teacher copy — the paper's memory argument, on our own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twinflow.plan.activations import ActivationModel, BlockShape, lora_sites
from twinflow.plan.forwards import ForwardSchedule, reference_counts, worst_case_schedule
from twinflow.plan.inputs import CUDA_CONTEXT_BYTES, GIB, GPU_MEMORY, PlanInputs, resolve_architecture
from twinflow.plan.params import ParamCounts, count_parameters, text_encoder_parameters, vae_parameters

OBJECTIVE_TENSORS_PER_ROW = 12
"""fp32 latent-sized tensors the objective holds per row (x, z, x_t, v, F, targets, fakes, Δv…)."""


@dataclass
class MemoryLine:
    name: str
    gpu: float
    host: float = 0.0
    note: str = ""


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    architecture: dict[str, Any]
    params: ParamCounts
    static: list[MemoryLine]
    phases: dict[str, float]
    """Transient bytes on top of ``static`` in each phase of the step."""
    schedule: ForwardSchedule
    """Forward calls of the micro-batch composition that needs the most memory."""
    per_b: ForwardSchedule
    """Expected forward calls per B rows (block shares, no rounding)."""
    activations: ActivationModel
    notes: list[str] = field(default_factory=list)
    cuda_context: int = CUDA_CONTEXT_BYTES

    # ---- totals ------------------------------------------------------------------------------

    @property
    def static_bytes(self) -> float:
        return sum(line.gpu for line in self.static)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def transient_peak(self) -> float:
        return self.phases[self.peak_phase]

    @property
    def allocated_peak(self) -> float:
        """What ``torch.cuda.max_memory_allocated`` should read: static + the largest phase."""
        return self.static_bytes + self.transient_peak

    @property
    def gpu_total(self) -> float:
        return self.allocated_peak + self.cuda_context

    @property
    def host_total(self) -> float:
        return sum(line.host for line in self.static)

    def _device(self, gpu_bytes: int | float | str | None) -> float:
        if gpu_bytes is None:
            return float(self.inputs.gpu_bytes)
        if isinstance(gpu_bytes, str):
            return float(GPU_MEMORY[gpu_bytes])
        return float(gpu_bytes)

    def headroom(self, gpu_bytes: int | float | str | None = None, margin: float | None = None) -> float:
        """Bytes left after the plan and the margin (negative: does not fit)."""
        device = self._device(gpu_bytes)
        m = self.inputs.margin if margin is None else margin
        return device * (1 - m) - self.gpu_total

    def fits(self, gpu_bytes: int | float | str | None = None, margin: float | None = None) -> bool:
        """True when the plan plus ``margin`` (default ``inputs.margin``) of the device fits.

        ``gpu_bytes``: bytes, a name from ``GPU_MEMORY`` ("h100", "h200", …), or None for ``inputs.gpu``.
        """
        return self.headroom(gpu_bytes, margin) >= 0

    # ---- output ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        inp = self.inputs
        return {
            "gpu": inp.gpu, "gpu_gib": round(inp.gpu_bytes / GIB, 2), "margin": inp.margin,
            "fits": self.fits(), "headroom_gib": round(self.headroom() / GIB, 2),
            "gpu_total_gib": round(self.gpu_total / GIB, 3), "allocated_peak_gib": round(self.allocated_peak / GIB, 3),
            "host_gib": round(self.host_total / GIB, 3), "peak_phase": self.peak_phase,
            "static_gib": {line.name: round(line.gpu / GIB, 3) for line in self.static},
            "host_by_line_gib": {line.name: round(line.host / GIB, 3) for line in self.static if line.host},
            "phases_gib": {k: round(v / GIB, 3) for k, v in self.phases.items()},
            "params": self.params.to_dict(),
            "tokens": {"image": inp.image_tokens, "text": inp.text_tokens},
            "forwards_worst_micro_batch": self.schedule.to_dict(),
            "forwards_per_b_expected": {k: round(v, 4) for k, v in self.per_b.b_equivalents(True).items()},
            "notes": list(self.notes),
        }

    def table(self) -> str:
        inp = self.inputs
        unit, div = ("GiB", GIB) if self.allocated_peak >= GIB else ("MiB", 1024**2)
        mode = inp.model.mode + (f" r{inp.model.lora.rank}" if inp.model.mode == "lora" else "")
        head = (f"{inp.method} | {mode} | {inp.model.dtype} | ZeRO-{inp.zero_stage}"
                f"{' +opt-offload' if inp.offload_optimizer else ''}{' +param-offload' if inp.offload_params else ''}"
                f" | {inp.num_gpus} GPU(s) | micro-batch {inp.micro_batch} × accum {inp.grad_accum}"
                f" | {inp.height}×{inp.width} ({inp.image_tokens} image + {inp.text_tokens} text tokens)"
                f" | GC {'on' if inp.model.gradient_checkpointing else 'off'} | teacher {inp.twinflow.teacher}")
        rows = [head, f"parameters: {self.params.total:,} (E2 {self.params.e2:,}; LoRA {self.params.lora:,})", "",
                f"{'per GPU':34s} {'GPU ' + unit:>9s} {'host ' + unit:>9s}  note"]
        for line in self.static:
            rows.append(f"  {line.name:32s} {line.gpu / div:9.2f} {line.host / div:9.2f}  {line.note}")
        rows.append(f"  {'= static':32s} {self.static_bytes / div:9.2f} {self.host_total / div:9.2f}")
        rows.append("transient, by phase of the step (the peak phase counts):")
        for name, value in self.phases.items():
            mark = "  <- peak" if name == self.peak_phase else ""
            rows.append(f"  {name:32s} {value / div:9.2f}{mark}")
        rows.append(f"  {'CUDA context':32s} {self.cuda_context / div:9.2f}")
        rows.append(f"  {'= GPU total':32s} {self.gpu_total / div:9.2f}   (allocator peak "
                    f"{self.allocated_peak / div:.2f})")
        verdict = "fits" if self.fits() else "does NOT fit"
        rows.append(f"{inp.gpu} ({inp.gpu_bytes / GIB:.1f} GiB, margin {inp.margin:.0%}): {verdict}, "
                    f"headroom {self.headroom() / GIB:.2f} GiB")
        fw = self.per_b.b_equivalents(True)
        rows.append(f"forwards per step (B-equivalents, expected): {fw['grad_forwards']:.2f} with grad + "
                    f"{fw['nograd_forwards']:.2f} without")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


# ---------------------------------------------------------------------------
# the planner
# ---------------------------------------------------------------------------


def plan_memory(inputs: PlanInputs) -> MemoryPlan:
    """Per-GPU memory of the configuration (see the module docstring). Raises ConfigError for
    inconsistent inputs (e.g. parameter offload without ZeRO-3, a global batch too small for the mix)."""
    inputs.validate()
    inputs.twinflow.validate("twinflow")
    arch = resolve_architecture(inputs)
    _require_planned_family(arch)
    m = inputs.model
    lora = m.mode == "lora"
    targets = tuple(m.lora_targets()) if lora else ()
    counts = count_parameters(arch, m.lora.rank if lora else None, targets)
    n, z = inputs.num_gpus, inputs.zero_stage
    a, lb = inputs.dtype_bytes, inputs.lora_bytes
    notes: list[str] = []

    # ---- what is trained, in which dtype -------------------------------------------------------
    if lora:
        trained = counts.lora + counts.e2
        trained_bytes = lb
        weights = (counts.total - counts.e2) * a + trained * lb
        if m.ema:
            weights += counts.lora * lb
    else:
        trained, trained_bytes = counts.total, a
        weights = counts.total * a
    copies = _teacher_copy(inputs, counts, a, lb, notes)
    extra_trained = own_fake = 0
    if inputs.method == "dmd":
        # DMD-style: a fake-score network trained alongside (a second adapter in LoRA mode, a
        # second model otherwise) and a frozen real-score teacher (the base, adapters off, in LoRA).
        extra_trained = counts.lora if lora else counts.total  # the fake adapter shares the student's E2
        weights += extra_trained * trained_bytes + (0 if lora else counts.total * a)
        # As train/fake_score.py trains it: full mode under ZeRO-3 in a DeepSpeed engine of its own
        # (partitioned like the student: fp32 master + moments / n); otherwise by a torch AdamW outside
        # DeepSpeed, replicated on every GPU, moments and gradients in the parameters' dtype.
        if lora or z != 3:
            own_fake, extra_trained = extra_trained, 0
            notes.append("dmd: + a trained fake score (its own AdamW, replicated) and a frozen teacher copy")
        else:
            notes.append("dmd: + a trained fake-score engine and a frozen teacher engine, both ZeRO-3 partitioned")
    trained_all = trained + extra_trained

    # ---- static lines ----------------------------------------------------------------------------
    lines: list[MemoryLine] = []
    part_w = n if z == 3 else 1
    w_local = weights / part_w
    lines.append(MemoryLine("weights", 0.0 if inputs.offload_params else w_local,
                            w_local if inputs.offload_params else 0.0,
                            "ZeRO-3 partition" if z == 3 else "replicated on every GPU"))
    if z == 3:
        live = min(inputs.buffers.stage3_max_live_parameters,
                   2 * counts.per_block + inputs.buffers.stage3_prefetch_bucket_size, counts.total)
        lines.append(MemoryLine("zero-3 gathered params", live * a, 0.0, "current + prefetched block"))
    opt_div = n if z >= 1 else 1
    master = trained_all * 4 / opt_div if trained_bytes != 4 else 0.0
    states = trained_all * 8 / opt_div
    off = inputs.offload_optimizer
    lines.append(MemoryLine("master weights (fp32)", 0.0 if off else master, master if off else 0.0,
                            "none: trained params are fp32" if trained_bytes == 4 else
                            f"{'partitioned /' + str(opt_div) if opt_div > 1 else 'full copy'}"))
    lines.append(MemoryLine("optimizer moments (fp32)", 0.0 if off else states, states if off else 0.0,
                            f"AdamW m, v of {trained_all:,} params" + (f" /{opt_div}" if opt_div > 1 else "")))
    grad_div = n if z >= 2 else 1
    grads = trained_all * trained_bytes / grad_div
    # DeepSpeed/DDP keep gradient buffers; accumulation keeps .grad between micro-batches.
    persistent_grads = z >= 1 or n > 1 or inputs.grad_accum > 1
    if off:
        lines[-1].host += trained_all * 4 / opt_div  # DeepSpeed's fp32 gradient partition on the host
    lines.append(MemoryLine("gradients", grads if persistent_grads else 0.0, 0.0,
                            ("partitioned" if grad_div > 1 else "full") + ("" if persistent_grads else
                                                                          "; allocated during backward (below)")))
    if own_fake:
        lines.append(MemoryLine("fake-score optimizer + gradients", own_fake * 3 * trained_bytes, 0.0,
                                f"torch AdamW m, v and gradients of {own_fake:,} params, replicated"))
    lines.append(MemoryLine("comm buffers", _comm_buffers(inputs, trained_all, trained_bytes), 0.0,
                            "DeepSpeed buckets" if n > 1 or z > 0 else "single process: none"))
    if copies:
        lines.append(MemoryLine("teacher copy", copies / (n if z == 3 and not lora else 1), 0.0,
                                f"teacher: {inputs.twinflow.teacher}"))
    if inputs.text_encoder_resident:
        lines.append(MemoryLine("text encoder (bf16)", text_encoder_parameters() * 2, 0.0, "Qwen2.5-VL-7B resident"))
    if inputs.vae_resident:
        lines.append(MemoryLine("VAE (bf16)", vae_parameters() * 2, 0.0, "resident"))
    c, h, w = inputs.latent_shape
    latent = c * h * w * 4
    prompt = inputs.text_tokens * int(arch["joint_attention_dim"]) * 4
    rows = inputs.micro_batch
    batch = rows * (latent * OBJECTIVE_TENSORS_PER_ROW + prompt * 2)
    lines.append(MemoryLine("batch + objective tensors", batch, 0.0, "latents, prompt + uncond embeddings, targets"))

    # ---- transient phases ----------------------------------------------------------------------
    act = ActivationModel(shape=BlockShape.from_architecture(arch), mode=m.mode, act_bytes=a, lora_bytes=lb,
                          lora_rank=m.lora.rank, wrapped=lora_sites(arch, targets) if lora else frozenset(),
                          gradient_checkpointing=m.gradient_checkpointing)
    schedule = worst_case_schedule(inputs.twinflow, rows, n, inputs.grad_accum)
    per_b = reference_counts(inputs.twinflow, rows)
    img, txt = inputs.image_tokens, inputs.text_tokens
    saved = act.saved(img, txt, rows)
    phases: dict[str, float] = {}
    pre = schedule.largest_nograd_rows(before_grad=True)
    if pre:
        phases["fake generation (no grad)"] = act.nograd_working_set(img, txt, pre)
    phases["grad forward"] = saved + act.grad_forward_transient(img, txt, rows)
    post = schedule.largest_nograd_rows(before_grad=False)
    if post:
        phases["no-grad passes (TwinFlow)"] = saved + act.nograd_working_set(img, txt, post)
    bwd = saved + act.backward_working_set(img, txt, rows)
    opt_temp = max(0.0 if off else trained_all * 4 / opt_div, own_fake * trained_bytes)  # foreach temporaries
    if not persistent_grads:
        # Plain single-process torch: gradients appear block by block during backward while the
        # saved activations are released, so the peak is at one of the two ends.
        first = grads * min(1.0, (counts.per_block + counts.outside_blocks) / counts.total)
        end = act.saved_outside(img, txt, rows) + act.backward_working_set(img, txt, rows) + grads
        bwd = max(bwd + first, end)
        opt_temp += grads
    phases["backward"] = bwd
    phases["optimizer step"] = opt_temp

    if inputs.twinflow.teacher == "ema" and lora and z == 3:
        notes.append("the LoRA-EMA teacher needs whole adapter weights: use ZeRO-1/2 (LoraEmaTeacher refuses ZeRO-3)")
    if inputs.twinflow.teacher in ("ema", "frozen") and not lora and z == 3:
        notes.append("a full-model EMA/frozen teacher under ZeRO-3 is counted partitioned: it needs a sharded copy")
    if m.mode == "lora" and z == 3:
        notes.append("ZeRO-3 with LoRA partitions the frozen base too (gathered per block)")
    if inputs.offload_optimizer:
        notes.append("optimizer offload: the AdamW step runs on the host CPU (DeepSpeedCPUAdam); expect slower steps")
    return MemoryPlan(inputs=inputs, architecture=arch, params=counts, static=lines, phases=phases,
                      schedule=schedule, per_b=per_b, activations=act, notes=notes)


def _require_planned_family(arch: dict) -> None:
    """The activation model (activations.py) and the encoder lines know Qwen-Image's blocks only: another
    family gets its exact parameter count and a ConfigError instead of a plan of the wrong model."""
    from twinflow.config.errors import ConfigError
    from twinflow.models.families import backbone_for_transformer_class

    name = arch.get("_class_name")
    family = backbone_for_transformer_class(name) if name else None
    if family is not None and not family.memory_planned:
        total = count_parameters(arch).total
        raise ConfigError(f"model.family: the memory planner models Qwen-Image's blocks, not {family.name}'s: no "
                          f"per-GPU plan for this model ({total / 1e6:,.2f}M parameters with E2, counted on the meta "
                          f"device)")


def _teacher_copy(inputs: PlanInputs, counts: ParamCounts, a: int, lb: int, notes: list[str]) -> float:
    mode = inputs.twinflow.teacher
    lora = inputs.model.mode == "lora"
    if mode == "self":
        return 0.0
    if lora:
        if mode == "ema":
            extra = counts.e2 * lb + (0 if inputs.model.ema else counts.lora * lb)
            return extra  # the "ema" adapter (when not already in the weights) + the E2 copy
        return counts.e2 * lb  # frozen: adapters off + the initial E2
    return counts.total * a  # a module copy (EmaTeacher / FrozenTeacher)


def _comm_buffers(inputs: PlanInputs, trained: int, trained_bytes: int) -> float:
    n, z, b = inputs.num_gpus, inputs.zero_stage, inputs.buffers
    if n == 1 and z == 0:
        return 0.0
    overlap = b.overlap_comm if b.overlap_comm is not None else z == 3
    reduce = min(b.reduce_bucket_size, trained) * trained_bytes
    if z == 3:
        return reduce * (2 if overlap else 1)
    gather = min(b.allgather_bucket_size, trained) * trained_bytes if z in (1, 2) else 0
    return (reduce + gather) * (4.5 if overlap else 1.0)
