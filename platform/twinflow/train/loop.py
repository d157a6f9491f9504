"""The Ray Train worker loop: one rank of a DeepSpeed data-parallel TwinFlow run.

Per optimizer step, for each of the ``gradient_accumulation`` micro-batches: allocate this rank's
rows to the TwinFlow blocks over the *global* batch (``allocate_micro_batch`` with the rank and
accumulation index, ``LossNorm.global_``), run the objective, ``engine.backward``,
``engine.step`` (DeepSpeed accumulates and steps the optimizer at the boundary). Then one
all-reduce of the step's statistics: per-block loss sums and counts, Δv norm, the non-finite
flags; every rank derives the same metrics and the same decisions from it, so no rank ever takes
a branch with a collective the others skip.

Non-finite losses: the rank's loss is turned into NaN before backward, so the gradients are NaN
and DeepSpeed's own overflow check (all-reduced inside the optimizer) discards the step on every
rank; the step is counted as skipped, its data consumed, the teacher not updated, the LR schedule
not advanced. ``run.nan_limit`` skipped steps in a row end the run cleanly; the driver then exits
with a message (a raise here would only make Ray Train restart into the same NaNs).

Checkpoints: every rank writes its DeepSpeed shard and its RNG state into a temp dir and calls
``ray.train.report`` with it (Ray merges the ranks' files); see train/state.py for the layout.
Resume restores weights, optimizer, LR schedule, EMA teacher, step, data position and RNG streams,
with the barrier inside ``checkpoint.as_directory()`` (Ray PR #57118).

Deterministic input errors (``INPUT_ERRORS``: a data shard over ``data.bad_share_limit``, an
unreadable or unsafe checkpoint, a truncated file) are not raised: Ray Train would treat them as a
worker failure and restart into the same error. The ranks agree on them instead (an all-gather
after each setup phase, and a MIN all-reduce of "my micro-batch is fine" before every forward) and
all return ``stop_reason: error`` with the one-line message, which the driver raises as
``RunInputError`` (train/trainer.py; the jobs print it and exit 2).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from twinflow.config.tree import from_dict, to_dict
from twinflow.data.digits import digit_prompts
from twinflow.data.sources import BadDataError
from twinflow.files import FileProblem
from twinflow.method.blocks import LossNorm, allocate_micro_batch
from twinflow.method.dmd import DMDConfig
from twinflow.method.objectives import single_network_objective
from twinflow.method.sampler import few_step, ode
from twinflow.models.qwen_encode import expand_condition
from twinflow.train.batches import DataStopped, MicroBatches
from twinflow.train.config import TrainConfig
from twinflow.train.faults import Faults
from twinflow.train.state import (FINAL_DIR, SAMPLES_DIR, CheckpointError, TrainState, check_complete,
                                  load_deepspeed_checkpoint, mark_complete, read_rank_state, restore_rng,
                                  seed_everything, tag_for, write_rank_state, write_shared_state)

INPUT_ERRORS = (BadDataError, CheckpointError, FileProblem, DataStopped)
"""Errors that a restart cannot fix: reported to the user instead of retried."""

STAT_KEYS = ("loss/total", "loss/one_step", "loss/near_diag", "loss/any_step", "loss/fake", "loss/rectify",
             "dv_norm", "fake_norm", "loss/meanflow", "loss/scm", "tangent_norm", "loss/real_velocity",
             "loss/dm", "loss/fake_score", "loss/regression", "fake_skipped", "loss/gan", "loss/gan_head")
"""Every statistic an objective may return, in the fixed order the ranks all-reduce them in; an objective's
stat outside this list stops the run at its first step (it would otherwise never reach the logs)."""
_STAT_SET = frozenset(STAT_KEYS)
_EXTRA = ("bad_loss", "skipped", "data_wait_s")  # appended after the (sum, count) pairs


def train_loop_per_worker(payload: dict) -> dict:
    """Ray Train entry point (train/trainer.py builds ``payload``); returns rank 0's summary."""
    return Worker(payload).run()


class Worker:
    def __init__(self, payload: dict):
        import ray.train

        self.cfg: TrainConfig = from_dict(TrainConfig, payload["config"])
        self.model_path: str = payload["model_path"]
        self.spec = payload["batch_spec"]
        self.storage = payload["storage"]
        self.data_fs = payload.get("data_filesystem")
        self.mlflow_env = payload.get("mlflow_env")
        self.data_counts = payload.get("data_counts")
        self._judge = None
        self.base_scores: dict[int, dict] = {}
        self.last_scores: tuple[int, dict] | None = None
        """(step, {nfe: digits_quality}) of the last digits probe."""
        self._counts: tuple[float, dict] | None = None
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world = ctx.get_local_world_size()
        self.faults = Faults(self.cfg.debug, self.rank)
        self.state = TrainState()
        self.tracker = None

    # ------------------------------------------------------------------ setup

    def _device(self) -> torch.device:
        if self.cfg.scaling.use_gpu:
            import ray.train.torch

            device = ray.train.torch.get_device()
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _threads(self) -> int:
        """torch CPU threads: the configured number, else the worker's CPU request, else (GPU workers
        that ask for no CPUs) an equal share of the node's cores."""
        s = self.cfg.scaling
        if s.threads_per_worker:
            return s.threads_per_worker
        if "CPU" in s.resources_per_worker:
            return max(1, int(s.resources_per_worker["CPU"]))
        return max(1, (os.cpu_count() or 1) // max(1, self.local_world))

    def setup(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(self._threads())
        if not cfg.scaling.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        from twinflow.models.lora import make_qwen_teacher
        from twinflow.train.ds_config import deepspeed_config
        from twinflow.train.engine import CallEqualizer, build_engine, max_network_calls

        self.device = self._device()
        # Ray's TorchBackend already set up the process group; DeepSpeed adopts it.
        deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
        seed_everything(cfg.run.seed + 7919 * self.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.run.seed * 1_000_003 + self.rank)
        self.engine, self.velocity = build_engine(cfg, self.model_path, deepspeed_config(cfg))
        # Built before a checkpoint is restored: a frozen teacher must hold the *initial* weights.
        self.teacher = make_qwen_teacher(cfg.twinflow.teacher, self.velocity, cfg.twinflow.teacher_ema_decay)
        self.fake_score = None
        if isinstance(cfg.objective_config, DMDConfig):  # DMD2 / VSD: a fake score beside the engine
            from twinflow.train.fake_score import FakeScore

            self.fake_score = FakeScore(cfg, self.velocity, self.model_path, self.world)
            self.objective = self.fake_score.objective
        else:
            self.objective = single_network_objective(cfg.objective_config)
        # ZeRO-3 gathers weights in collectives at every pass, so ranks must run the networks equally often.
        # DMD's passes per micro-batch do not depend on the rank's rows (no blocks); the others' do.
        self.equalizer = (CallEqualizer(self.velocity, max_network_calls(cfg.objective_config))
                          if cfg.deepspeed.zero_stage == 3 and self.fake_score is None else None)
        self.uncond = self._uncond()

    def _encoder(self):
        from twinflow.data.encode import cached_encoder

        s = self.spec
        return cached_encoder(s.model_path, s.encode_device, s.encode_dtype, s.max_sequence_length)

    def _uncond(self) -> dict[str, torch.Tensor]:
        if self.spec.kind == "raw":
            cond = self._encoder().uncond()
        else:
            from twinflow.data.cache import load_uncond

            cond = load_uncond(self.cfg.data.source, self.data_fs)
        return {k: v.to(self.device) for k, v in cond.items()}

    def restore(self) -> bool:
        import ray.train
        import torch.distributed as dist

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        from twinflow.train.engine import reset_lr_schedule

        with checkpoint.as_directory() as d:
            # Our own files first (JSON + safetensors, no collectives), then DeepSpeed's pickles, read
            # weights-only; after each, the ranks agree so that none waits in a collective for a rank
            # that stopped on a bad file.
            shared, rng, error = None, None, None
            try:
                shared = check_complete(d, self.world)
                rng = read_rank_state(d, self.rank)
            except INPUT_ERRORS as exc:
                error = str(exc)
            self.agree(error)
            try:
                load_deepspeed_checkpoint(self.engine, d, shared["tag"], load_module_strict=not self.cfg.is_lora,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
                if self.fake_score is not None:
                    self.fake_score.load_files(d, shared["tag"])
            except INPUT_ERRORS as exc:
                error = str(exc)
            self.agree(error)
            reset_lr_schedule(self.engine, self.cfg)
            self.state = TrainState.from_dict(shared["state"])
            self.state.resumed_from.append(self.state.step)
            if shared["teacher"] is not None and hasattr(self.teacher, "load_state_dict"):
                self.teacher.load_state_dict(shared["teacher"])
            if self.fake_score is not None:
                if shared["fake_score"] is None:
                    raise RunStop(f"{checkpoint.path}: has no fake score, so it was not written by a "
                                  f"{self.cfg.method} run; resume it with its own method or start a new run.name")
                self.fake_score.load_state_dict(shared["fake_score"])
            restore_rng(*rng, self.generator)
            # Inside the block: no rank may leave (and delete a downloaded copy) while others read.
            if self.world > 1:
                dist.barrier()
        if self.rank == 0:
            print(f"[twinflow] resumed from {checkpoint.path} at step {self.state.step} (epoch {self.state.epoch}, "
                  f"micro-batch {self.state.micro_in_epoch})", file=sys.stderr, flush=True)
        return True

    def agree(self, error: str | None) -> None:
        """Collective: raise RunStop on every rank when any rank has an input error (its message)."""
        if self.world > 1:
            import torch.distributed as dist

            box: list = [None] * self.world
            dist.all_gather_object(box, error)
            error = next((e for e in box if e), None)
        if error:
            raise RunStop(error)

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, step: int) -> dict:
        cfg, engine = self.cfg, self.engine
        weights, layout = cfg.block_weights(), cfg.layout
        if hasattr(self.objective, "set_step"):
            self.objective.set_step(self.state.step)  # sCM's tangent warm-up counts optimizer steps
        norm = LossNorm.global_(weights, layout)
        t0 = time.perf_counter()
        lr = float(engine.get_lr()[0])
        sums = torch.zeros(2 * len(STAT_KEYS) + len(_EXTRA), dtype=torch.float64)
        bad = 0
        for accum in range(layout.accum_steps):
            batch = self.data.next()
            x = self.faults.latents(step, accum, batch["latents"])
            cond = {"prompt_embeds": batch["prompt_embeds"], "prompt_mask": batch["prompt_mask"]}
            ids = allocate_micro_batch(weights, layout, self.rank, accum, self.state.step)
            if self.equalizer is not None:
                self.equalizer.begin()
            out = self.objective(engine, x, cond, ids, uncond=expand_condition(self.uncond, x.shape[0]),
                                 teacher=self.teacher, model_nograd=self.velocity, generator=self.generator, norm=norm)
            if self.equalizer is not None:
                self.equalizer.pad(x, cond)
            loss = out.loss
            if not bool(torch.isfinite(loss.detach())):
                bad += 1
                loss = loss * float("nan")  # NaN gradients: DeepSpeed's overflow check drops the step everywhere
            engine.backward(loss)
            engine.step()
            unknown = set(out.stats) - _STAT_SET
            if unknown:
                raise RuntimeError(f"the objective returned statistics {sorted(unknown)} that train/loop.py "
                                   f"STAT_KEYS does not list; add them there so every rank reduces and logs them")
            for i, key in enumerate(STAT_KEYS):
                if key in out.stats:
                    s, c = out.stats[key]
                    sums[2 * i] += float(s)
                    sums[2 * i + 1] += float(c)
        applied = engine.was_step_applied()
        if bad and applied:
            raise RuntimeError(f"step {step}: DeepSpeed applied a step whose loss was not finite; refusing to "
                               f"continue with corrupted weights")
        base = 2 * len(STAT_KEYS)
        sums[base] = bad
        sums[base + 1] = 0 if applied else 1
        sums[base + 2] = self.data.take_wait()
        sums = self._all_reduce(sums)
        dt = time.perf_counter() - t0
        row: dict = {"step": step, "epoch": self.data.epoch, "lr": lr}
        for i, key in enumerate(STAT_KEYS):
            if sums[2 * i + 1] > 0:
                row[key] = float(sums[2 * i] / sums[2 * i + 1])
        skipped = bool(sums[base + 1] > 0)
        grad_norm = engine.get_global_grad_norm()
        row.update({"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "images_per_s": layout.global_batch / dt, "step_time_s": dt, "wall_time": time.time(),
                    "data_wait_s": float(sums[base + 2]) / self.world, "step_skipped": int(skipped),
                    "nonfinite_microbatches": int(sums[base]), "peak_mem_gb": _peak_memory_gb(self.device)})
        st = self.state
        if skipped:
            st.skipped_steps += 1
            st.nan_streak += 1
        else:
            st.nan_streak = 0
            self.update_teacher(step)
        st.step = step
        st.epoch, st.micro_in_epoch = self.data.epoch, self.data.index
        st.samples_seen += layout.global_batch
        row.update({"skipped_steps": st.skipped_steps, "nan_streak": st.nan_streak, "samples_seen": st.samples_seen})
        return row

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world == 1:
            return t
        dev = self.device if self.cfg.scaling.use_gpu else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t)
        return t.cpu()

    # ------------------------------------------------------------------ checkpoints, samples, export

    def render_grid(self):
        if self.samples is None:
            return None
        return self.samples.render(self.velocity)

    def quality_probe(self) -> dict:
        """The probe section's metrics (rank 0; {} elsewhere), e.g. nfe_gap_mse for Tune's ASHA."""
        if self.cfg.probe.kind == "nfe_gap":
            return self.samples.nfe_gap(self.velocity, self.cfg.probe.reference_nfe)
        if self.cfg.probe.kind == "digits":
            self.last_scores = (self.state.step, self.digits_scores(self.cfg.probe.nfe, few_step))
            return {f"digits_{m}_{n}nfe": v for n, q in self.last_scores[1].items() for m, v in q.items()
                    if m != "per_class"}
        raise ValueError(f"probe.kind {self.cfg.probe.kind!r} has no implementation")

    def digits_scores(self, nfes: list[int], sampler) -> dict[int, dict]:
        """probe.kind digits: twinflow.study.metrics.digits_quality of the probe prompts' images at each
        NFE with ``sampler`` (few_step or ode) on rank 0 ({} elsewhere); collective under ZeRO-3."""
        import numpy as np

        from twinflow.study.datasets import images_to_digits, load_digits_at
        from twinflow.study.metrics import DigitsJudge, digits_quality

        p = self.cfg.probe
        out = {}
        for n in nfes:
            images = self.samples.probe_images(self.velocity, sampler(n), p.images_per_prompt)
            if images is None:
                continue
            if self._judge is None:
                self._judge = DigitsJudge.fit(load_digits_at(self.cfg.sample.height), classifier="svc")
            labels = np.repeat([label for _, _, label in digit_prompts()], p.images_per_prompt)
            groups = np.repeat(np.arange(len(digit_prompts())), p.images_per_prompt)
            u8 = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            out[n] = digits_quality(self._judge, images_to_digits(u8), labels, groups)
        return out

    def save_checkpoint(self, row: dict, grid) -> None:
        import ray.train

        step = self.state.step
        tag = tag_for(step)
        with tempfile.TemporaryDirectory(prefix="twinflow-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=tag, client_state={"twinflow_step": step},
                                        exclude_frozen_parameters=self.cfg.is_lora)
            if self.fake_score is not None:
                self.fake_score.save_files(tmp, tag)
            write_rank_state(tmp, self.rank, self.generator)
            if self.rank == 0:
                if grid is not None:
                    png = Path(tmp) / SAMPLES_DIR / f"step_{step:08d}.png"
                    png.parent.mkdir(parents=True, exist_ok=True)
                    grid.save(png)
                    self.tracker.log_image(step, grid, str(png))
                teacher_state = self.teacher.state_dict() if hasattr(self.teacher, "state_dict") else None
                write_shared_state(tmp, self.state, teacher_state, self.world, tag, to_dict(self.cfg),
                                   self.fake_score.state_dict() if self.fake_score is not None else None)
                self.tracker.sync()
            self.faults.in_checkpoint(step)
            mark_complete(tmp, self.rank)
            ray.train.report(_ray_metrics(row), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{tag}")
        wait_for_commit()


    def save_extra_grid(self, step: int, grid) -> None:
        if self.rank != 0 or grid is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"step_{step:08d}.png"
            grid.save(png)
            self.storage.write_bytes(png.read_bytes(), SAMPLES_DIR, png.name)
            self.tracker.log_image(step, grid, str(png))

    def export(self, grid) -> str | None:
        import torch.distributed as dist

        from twinflow.train.export import gather_transformer, write_final

        transformer = gather_transformer(self.engine, self.cfg, self.rank)
        uri = None
        if self.rank == 0:
            teacher_state = self.teacher.state_dict() if hasattr(self.teacher, "state_dict") else None
            with tempfile.TemporaryDirectory(prefix="twinflow-final-") as tmp:
                write_final(transformer, self.cfg, self.model_path, tmp, self.state.history, teacher_state, grid)
                uri = self.storage.upload_dir(tmp, FINAL_DIR)
        if self.world > 1:
            dist.barrier()
        return uri

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        try:
            return self._run()
        except RunStop as stop:
            if self.tracker is not None:
                self.tracker.close(None)
            return {"step": self.state.step, "stop_reason": "error", "error": str(stop),
                    "skipped_steps": self.state.skipped_steps, "nan_streak": self.state.nan_streak, "final": None,
                    "data": self.data_summary()}

    def digits_summary(self) -> dict | None:
        """probe.kind digits: the starting model's scores and the last probe's (rank 0)."""
        if self.rank != 0 or self.cfg.probe.kind != "digits":
            return None
        return {"base": {str(n): q for n, q in self.base_scores.items()},
                "step": self.last_scores[0] if self.last_scores else None,
                "trained": {str(n): q for n, q in (self.last_scores[1] if self.last_scores else {}).items()}}

    def data_summary(self, max_age_s: float = 0.0) -> dict | None:
        """Samples seen / usable / skipped per reason so far (raw data: the decode ledger, one entry per
        shard; a cache: its manifest's counts from pre-caching); rank 0 only. ``max_age_s``: reuse a
        reading at most this old (metric rows ask every step)."""
        if self.rank != 0 or not self.data_counts:
            return None
        if "static" in self.data_counts:
            return dict(self.data_counts["static"])
        now = time.monotonic()
        if self._counts is None or now - self._counts[0] > max_age_s:
            import ray

            from twinflow.data.ingest import summarize

            self._counts = (now, summarize(ray.get(self.data_counts["ledger"].all.remote())))
        return self._counts[1]

    # ------------------------------------------------------------------ the hooks
    # One trainer, named hooks: a second method or backbone changes what a hook does, not the loop.

    def update_teacher(self, step: int) -> None:
        """After every applied optimizer step (self teachers do nothing, EMA ones average)."""
        self.teacher.update(self.velocity)

    def start_samples(self) -> None:
        """Before anything is restored or trained: the sample-grid renderer and the base's own columns
        and scores (probe.kind digits), from the starting weights."""
        from twinflow.train.samples import SampleGrid

        cfg = self.cfg
        self.samples = None
        if not cfg.sample.enabled:
            return
        probe_prompts = [p for _, p, _ in digit_prompts()] if cfg.probe.kind == "digits" else None
        self.samples = SampleGrid(cfg.sample, self.model_path, self.rank, self.world,
                                  cfg.deepspeed.zero_stage == 3, self.device,
                                  encoder=self._encoder() if self.spec.kind == "raw" and self.rank == 0 else None,
                                  max_sequence_length=cfg.encode.max_sequence_length,
                                  encode_dtype=cfg.encode.dtype, probe_prompts=probe_prompts)
        self.samples.render_base(self.velocity)
        self.base_scores = self.digits_scores(cfg.probe.base_nfe, ode) if cfg.probe.kind == "digits" else {}

    def probe(self, step: int, row: dict, reported: bool) -> bool:
        """At steps reported to Ray (the same on every rank: ZeRO-3 runs the probe on all): the quality
        probe's metrics into ``row``. True when the row must be logged."""
        if reported and self.cfg.probe.kind != "none":
            row.update(self.quality_probe())
            return True
        return False

    def sample_grids(self, step: int, checkpoint: bool):
        """The grid of this step (rank 0; None elsewhere and between grids); every ``sample.every``
        steps a grid that is not a checkpoint's is saved on its own."""
        extra = self.cfg.sample.every > 0 and step % self.cfg.sample.every == 0
        if not (checkpoint or extra):
            return None, False
        grid = self.render_grid()
        if extra and not checkpoint:
            self.save_extra_grid(step, grid)
        return grid, True

    def finish(self, grid, grid_step: int | None) -> str | None:
        """The run reached max_steps: the final grid (unless this attempt just drew it) and the export."""
        if grid_step != self.state.step:  # resumed at the end: no grid rendered in this attempt yet
            grid = self.render_grid()
        return self.export(grid)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> dict:
        import ray.train

        from twinflow.train.tracking import Tracker

        cfg = self.cfg
        error = None
        try:
            self.setup()
        except INPUT_ERRORS as exc:
            error = str(exc)
        self.agree(error)
        self.start_samples()
        resumed = self.restore()
        st = self.state
        self.data = MicroBatches(ray.train.get_dataset_shard("train"), self.spec, self.device, st.epoch,
                                 st.micro_in_epoch, world=self.world, rank=self.rank, seed=cfg.run.seed)
        if self.rank == 0:
            self.tracker = Tracker(cfg, self.storage, st, resumed, self.mlflow_env)
        stop_at = min(cfg.run.max_steps, cfg.run.stop_at_step or cfg.run.max_steps)
        stop_reason = None
        grid, grid_step = None, None  # grid_step is the same on every rank; grid exists on rank 0 only
        every = cfg.logging.ray_report_every
        while st.step < stop_at:
            step = st.step + 1
            try:
                row = self.train_step(step)
            except DataStopped as exc:  # every rank raises it together (MicroBatches agrees per micro-batch)
                raise RunStop(str(exc)) from None
            checkpoint = step % cfg.run.checkpoint_every == 0 or step == stop_at
            ray_report = checkpoint or bool(every and step % every == 0)
            logged = self.probe(step, row, ray_report) or step % cfg.run.log_every == 0
            if self.rank == 0 and (logged or checkpoint or row["step_skipped"]):
                row.update(_data_metrics(self.data_summary(max_age_s=0.0 if checkpoint else 10.0)))
                st.history.append(_json_row(row))
                self.tracker.log(step, row)
            self.faults.after_step(step)
            if st.nan_streak >= cfg.run.nan_limit:
                stop_reason = "nan_limit"
                break
            grid, drawn = self.sample_grids(step, checkpoint)
            grid_step = step if drawn else grid_step
            if checkpoint:
                self.save_checkpoint(row, grid)
            elif ray_report:
                ray.train.report(_ray_metrics(row))
        final = None
        if stop_reason is None and st.step >= cfg.run.max_steps:
            final = self.finish(grid, grid_step)
            stop_reason = "done"
        elif stop_reason is None:
            stop_reason = "stop_at_step"
        if self.tracker is not None:
            self.tracker.close(final)
        if self.equalizer is not None:
            self.equalizer.remove()
        return {"step": st.step, "stop_reason": stop_reason, "skipped_steps": st.skipped_steps,
                "nan_streak": st.nan_streak, "final": final, "resumed": resumed, "resumed_from": list(st.resumed_from),
                "data": self.data_summary(), "digits": self.digits_summary(),
                "last": st.history[-1] if st.history else None,
                "zero3_padding_passes": self.equalizer.padded if self.equalizer is not None else 0}


class RunStop(Exception):
    """Raised on every rank together (``Worker.agree``): end the run with this message, no retry."""


def _data_metrics(summary: dict | None) -> dict:
    if not summary:
        return {}
    out = {"data/seen": summary["seen"], "data/ok": summary["ok"]}
    out.update({f"data/skipped/{k}": v for k, v in summary["skipped"].items()})
    return out


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux: peak RSS


def _json_row(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and (v != v or abs(v) == float("inf")) else v) for k, v in row.items()}


def _ray_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def wait_for_commit(timeout_s: float = 120.0) -> None:
    """Block until Ray Train's controller has taken this worker's last report.

    ``ray.train.report`` only queues the report (a queue of one, drained by the controller's health
    poll every ~2 s); a worker that dies before the poll takes it loses the checkpoint, and the
    restart goes back one checkpoint further (Ray 2.60 notes the missing two-phase commit in
    worker.poll_status). Waiting here makes a finished checkpoint a committed one. Uses Ray's
    internal train context: a Ray without it just skips the wait.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().execution_context.result_queue
    except Exception:  # noqa: BLE001 - internal API; the wait is an optimisation of recovery only
        return
    deadline = time.monotonic() + timeout_s
    while queue.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
