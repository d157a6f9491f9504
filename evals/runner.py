"""Orchestration: checkpoint -> images (generation pool) -> records (one scorer pool per benchmark)
-> numbers, coverage and reports. ``watch`` repeats it for each new checkpoint of a training run.

Output tree (default ``<checkpoint>/eval``)::

    <benchmark>/settings.json          generation + scorer settings the folder was made with
    <benchmark>/nfe<N>/images/...      the official layout (evals.layout)
    <benchmark>/generation.jsonl       per-prompt generation records (failures keep their error)
    <benchmark>/records.jsonl          per-prompt scorer records, appended shard by shard
    <benchmark>/results.json|md, grid.png
    summary.md                         all benchmarks' tables

Resume: images that exist are not generated again and recorded items are not scored again
(failed/skipped ones are, unless ``retry_failed=false``). Different generation settings in an
existing folder are an error (mixing them would corrupt the numbers); different scorer settings
re-score from the kept images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twinflow.config import ConfigError, to_dict

from evals import aggregate, layout
from evals.checkpoints import NeedsConversion, WatchState, discover, resolve_pipeline_folder
from evals.config import EvalConfig, StageConfig
from evals.generate import GenerationActor, GenerationOptions, GenTask, image_seed, resolve_kind
from evals.pool import ShardPool, StageError, actor_options
from evals.prompts import (FILE_BENCHMARKS, Item, geneval_object_names, load_digits, load_dpg, load_dpg_questions,
                           load_geneval, load_wise, resolve_data_root)
from evals.records import RecordStore
from evals.digits.rules import reference_rows as digits_references
from evals.report import protocol_label, references, write_reports

log = logging.getLogger("evals")

ShardHook = Callable[[str, ShardPool, list, list], None]


@dataclass
class Hooks:
    """Progress callbacks; ``on_shard(stage, pool, shard, records)`` runs on the driver per finished shard."""

    on_shard: ShardHook | None = None


@dataclass
class Plan:
    name: str
    items: list[Item]
    n_images: int
    size: tuple[int, int]
    out: Path
    scorer: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> RecordStore:
        return RecordStore(self.out / "records.jsonl")

    @property
    def gen_records(self) -> RecordStore:
        return RecordStore(self.out / "generation.jsonl")

    def images(self, nfe: int) -> Path:
        return layout.image_dir(self.out.parent, self.name, nfe)


def ensure_ray(cfg: EvalConfig):
    import ray

    from twinflow.ray_env import connect

    connect(log_to_driver=False, address=cfg.pool.ray_address or None)
    return ray


def resolve_device(cfg: EvalConfig) -> str:
    import ray

    if cfg.pool.device != "auto":
        return cfg.pool.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def resolve_model_names(cfg: EvalConfig, data_root: Path) -> EvalConfig:
    """The config with every ``tiny`` / ``tiny:<kind>`` model name replaced by its folder in the cache
    (built on first use); a user's paths are never created."""
    from evals.tiny_models import is_tiny_name, resolve_tiny_path
    from twinflow.named import is_named_model, resolve_model

    if not any(is_tiny_name(v) for v in (cfg.geneval.detector, cfg.geneval.clip, cfg.dpg.vqa_model,
                                           cfg.wise.local_model)) and not is_named_model(cfg.checkpoint):
        return cfg
    names = geneval_object_names(data_root) if "geneval" in cfg.benchmarks else ()
    return dataclasses.replace(
        cfg, checkpoint=resolve_model(cfg.checkpoint),
        geneval=dataclasses.replace(cfg.geneval, detector=resolve_tiny_path(cfg.geneval.detector, names),
                                    clip=resolve_tiny_path(cfg.geneval.clip)),
        dpg=dataclasses.replace(cfg.dpg, vqa_model=resolve_tiny_path(cfg.dpg.vqa_model)),
        wise=dataclasses.replace(cfg.wise, local_model=resolve_tiny_path(cfg.wise.local_model)))


def check_checkpoint_files(ckpt: Path) -> None:
    """Every safetensors / JSON file of the checkpoint (a final/ folder's LoRA, its pipeline, an export)
    complete: a truncated one is a FileProblem naming it, before any generation."""
    from twinflow.files import check_tree

    if not ckpt.exists():
        raise FileNotFoundError(f"--checkpoint {ckpt}: no such folder")
    check_tree(ckpt, skip_dirs=("eval",))


def plan_benchmark(name: str, cfg: EvalConfig, data_root: Path, out: Path) -> Plan:
    if name == "geneval":
        g = cfg.geneval
        rules = {k: getattr(g, k) for k in ("threshold", "counting_threshold", "max_objects", "nms_threshold",
                                             "position_threshold")}
        from evals.geneval.rules import GenEvalRules

        scorer = {"detector": g.detector, "clip": g.clip, "class_mapping": g.class_mapping,
                  "detector_resize": [g.detector_short_edge, g.detector_long_edge], "rules": rules,
                  "official_rules": GenEvalRules(**rules).is_official(),
                  "stand_in": "transformers Mask2Former for mmdet 2.x Mask2Former Swin-S (different weights)"}
        return Plan(name, load_geneval(data_root, cfg.limit), g.images_per_prompt, (g.resolution, g.resolution),
                    out / name, scorer, {"object_names": geneval_object_names(data_root), "config": to_dict(g)})
    if name == "dpg":
        d = cfg.dpg
        from evals.dpg import rules as dpg_rules
        from evals.dpg.vqa import DEFAULT_MODELS

        rows = dpg_rules.read_rows(load_dpg_questions(d.questions_csv, out / "dpg", d.questions_blob))
        union = dpg_rules.question_union(rows)
        scorer = {"vqa": d.vqa, "vqa_model": d.vqa_model or DEFAULT_MODELS[d.vqa], "mode": d.mode,
                  "questions_csv": d.questions_csv, "stand_in": "for mPLUG-large (modelscope), no transformers port"}
        return Plan(name, load_dpg(data_root, cfg.limit), 4, (d.tile_resolution, d.tile_resolution), out / name,
                    scorer, {"rows": rows, "questions": {k: [[q.qid, q.text] for q in pq.questions.values()]
                                                         for k, pq in union.items()}})
    if name == "digits":
        d = cfg.digits
        from evals.digits.rules import judge_for

        rules = d.rules()
        scorer = {"classifier": "RBF SVM on real digits (sklearn)", "heldout_accuracy": judge_for(rules).heldout_accuracy,
                  "threshold": d.threshold, "k": d.k, "feature_dims": d.feature_dims,
                  "reference": f"the 1,797 real digits rendered at {d.resolution} px"}
        return Plan(name, load_digits(d.templates, cfg.limit), d.images_per_prompt, (d.resolution, d.resolution),
                    out / name, scorer, {"rules": rules})
    w = cfg.wise
    from evals.wise.judge import OFFICIAL_JUDGES, judge_prompt

    judge_model = (w.api_model or OFFICIAL_JUDGES[w.protocol]) if w.judge == "api" else w.local_model
    scorer = {"protocol": w.protocol, "judge": w.judge, "judge_model": judge_model,
              "official_judge": w.judge == "api" and judge_model == OFFICIAL_JUDGES[w.protocol],
              "prompt_source": judge_prompt(w.protocol, w.prompt_file).source, "rewrite": w.rewrite,
              "max_attempts": w.max_attempts, **({"reply": w.local_reply} if w.judge == "local" else {})}
    return Plan(name, load_wise(data_root, w.protocol, w.rewrite, cfg.limit), 1, (w.resolution, w.resolution),
                out / name, scorer, {"config": to_dict(w)})


def _generation_settings(cfg: EvalConfig, plan: Plan, folder: Path) -> dict[str, Any]:
    g = cfg.generation
    return {"pipeline": str(folder.resolve()), "generator": resolve_kind(folder, g.generator), "seed": g.seed,
            "dtype": g.dtype, "true_cfg_scale": g.true_cfg_scale, "negative_prompt": g.negative_prompt,
            "max_sequence_length": g.max_sequence_length, "extra_call_kwargs": g.extra_call_kwargs,
            "size": list(plan.size), "images_per_prompt": plan.n_images,
            "prompt_set": plan.scorer.get("protocol", plan.name) + (":rewrite" if plan.scorer.get("rewrite") else "")}


def _check_settings(cfg: EvalConfig, plan: Plan, gen: dict) -> None:
    """Refuse to mix generation settings in one folder; re-score when only the scorer changed."""
    path = plan.out / "settings.json"
    if not cfg.resume and plan.out.exists():
        shutil.rmtree(plan.out)
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("generation") != gen:
            diff = sorted(k for k in set(gen) | set(old.get("generation", {})) if gen.get(k) != old["generation"].get(k))
            raise ConfigError(f"output_dir: {plan.out} holds images made with other generation settings "
                              f"({', '.join(diff)}); use another output_dir or --set resume=false to start over")
        if old.get("scorer") != plan.scorer:
            log.warning("%s: scorer settings changed; re-scoring from the kept images", plan.name)
            plan.records.reset()
    plan.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generation": gen, "scorer": plan.scorer}, indent=2))


def stage_device(stage: StageConfig, device: str) -> str:
    """A stage runs on CUDA only when the pool does and the stage asks for GPUs (an API judge does not)."""
    return "cuda" if device == "cuda" and stage.num_gpus > 0 else "cpu"


def _stage_options(cfg: EvalConfig, stage: StageConfig, device: str) -> dict[str, Any]:
    return actor_options(stage_device(stage, device), stage.num_cpus, stage.num_gpus, cfg.pool.eval_resource,
                         stage.runtime_env)


def _threads(stage: StageConfig, device: str) -> int:
    return max(1, int(stage.num_cpus)) if stage_device(stage, device) == "cpu" else 0


def _chunks(seq: list, n: int) -> list[list]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def run_generation(cfg: EvalConfig, plans: list[Plan], folder: Path, device: str, hooks: Hooks) -> tuple[dict, set]:
    """Render every missing image; returns (pool stats, {(benchmark, nfe, key)} regenerated)."""
    tasks: list[GenTask] = []
    for plan in plans:
        for nfe in cfg.nfe:
            root = plan.images(nfe)
            for it in plan.items:
                if not layout.is_complete(plan.name, root, it, plan.n_images):
                    seeds = [image_seed(cfg.generation.seed, plan.name, it.key, k) for k in range(plan.n_images)]
                    tasks.append(GenTask(plan.name, nfe, it, seeds, plan.size))
    st = cfg.pool.generate
    groups: dict[tuple, list[GenTask]] = {}
    for t in tasks:
        groups.setdefault((t.benchmark, t.nfe), []).append(t)
    shards = [c for g in groups.values() for c in _chunks(g, st.shard_size)]
    by_name = {p.name: p for p in plans}
    regenerated: set = set()

    def on_result(shard, records, pool):
        for rec in records:
            plan = by_name[rec["benchmark"]]
            if rec["status"] == "generated":
                layout.write(plan.images(rec["nfe"]), rec.pop("files"))
                regenerated.add((rec["benchmark"], rec["nfe"], rec["key"]))
        for plan in plans:
            plan.gen_records.append([r for r in records if r["benchmark"] == plan.name])
        if hooks.on_shard:
            hooks.on_shard("generate", pool, shard, records)

    def make_failed(task: GenTask, error: str) -> dict:
        return {"benchmark": task.benchmark, "nfe": task.nfe, "key": task.item.key, "status": "failed", "error": error}

    g = cfg.generation
    options = GenerationOptions(g.dtype, g.true_cfg_scale, g.negative_prompt, g.max_sequence_length,
                                dict(g.extra_call_kwargs))
    pool = ShardPool("generate", GenerationActor,
                     (str(folder), g.generator, stage_device(st, device), options, st.batch_size,
                      _threads(st, device)),
                     _stage_options(cfg, st, device), st.num_actors, cfg.pool.max_attempts, cfg.pool.shard_timeout_s)
    stats = pool.run(shards, on_result, make_failed)
    return stats.as_dict(), regenerated


def _scorer_actor(plan: Plan, cfg: EvalConfig, device: str, threads: int) -> tuple[type, tuple]:
    from evals.scorers import DigitsScorer, DPGScorer, GenEvalScorer, WISEScorer

    if plan.name == "digits":
        return DigitsScorer, (dataclasses.asdict(plan.extra["rules"]), threads)
    if plan.name == "geneval":
        return GenEvalScorer, (plan.extra["config"], plan.extra["object_names"], device, threads)
    if plan.name == "dpg":
        return DPGScorer, (cfg.dpg.vqa, plan.scorer["vqa_model"], device, cfg.dpg.vqa_batch_size, threads)
    wise_cfg = dict(plan.extra["config"])
    # The judge key is read from the driver's environment and handed to the actors (which may run on
    # other nodes without it); it is never written to settings, records or reports.
    key = os.environ.get(cfg.wise.api_key_env, "") if cfg.wise.api_key_env else ""
    if key:
        wise_cfg["api_key"] = key
    return WISEScorer, (wise_cfg, device, threads)


def run_scoring(cfg: EvalConfig, plan: Plan, device: str, regenerated: set, hooks: Hooks) -> dict:
    latest = plan.records.latest()
    todo: list[tuple[int, Item]] = []
    for nfe in cfg.nfe:
        root = plan.images(nfe)
        for it in plan.items:
            if not layout.is_complete(plan.name, root, it, plan.n_images):
                continue
            rec = latest.get((nfe, it.key))
            fresh = (plan.name, nfe, it.key) in regenerated
            if rec is not None and not fresh and (rec["status"] == "scored" or not cfg.retry_failed):
                continue
            todo.append((nfe, it))
    stage: StageConfig = getattr(cfg.pool, plan.name)
    shards = _chunks(todo, stage.shard_size)

    def prepare(shard):
        tasks = []
        for nfe, it in shard:
            meta = dict(it.meta)
            if plan.name == "dpg":
                meta = {"questions": plan.extra["questions"].get(it.key, [])}
            elif plan.name == "wise":
                meta["prompt"] = it.prompt
            tasks.append({"benchmark": plan.name, "nfe": nfe, "key": it.key, "meta": meta,
                          "images": layout.read_images(plan.name, plan.images(nfe), it, plan.n_images)})
        return tasks

    def on_result(shard, records, pool):
        plan.records.append(records)
        if hooks.on_shard:
            hooks.on_shard(plan.name, pool, shard, records)

    def make_failed(entry, error):
        nfe, it = entry
        return {"benchmark": plan.name, "nfe": nfe, "key": it.key, "status": "failed", "error": error, "data": {}}

    if plan.name == "wise" and cfg.wise.judge == "local" and device == "cuda" and stage.num_gpus == 0:
        log.warning("wise: the local judge runs on CPU; set pool.wise.num_gpus=1 to put it on a GPU")
    actor_cls, init_args = _scorer_actor(plan, cfg, stage_device(stage, device), _threads(stage, device))
    pool = ShardPool(plan.name, actor_cls, init_args, _stage_options(cfg, stage, device), stage.num_actors,
                     cfg.pool.max_attempts, cfg.pool.shard_timeout_s)
    return pool.run(shards, on_result, make_failed, prepare).as_dict()


def summarize(cfg: EvalConfig, plan: Plan, ckpt: Path, folder: Path, gen: dict, pools: dict, errors: list) -> dict:
    latest = plan.records.latest()
    gen_latest = plan.gen_records.latest()
    per_nfe = {}
    for nfe in cfg.nfe:
        root = plan.images(nfe)
        generated = {it.key for it in plan.items if layout.is_complete(plan.name, root, it, plan.n_images)}
        gen_errors = {k: r.get("error", "") for (n, k), r in gen_latest.items() if n == nfe and r["status"] == "failed"
                      and k not in generated}
        if plan.name == "geneval":
            res = aggregate.geneval(plan.items, nfe, latest, plan.n_images)
        elif plan.name == "dpg":
            res = aggregate.dpg(plan.items, nfe, latest, plan.extra["rows"], cfg.dpg.mode)
        elif plan.name == "digits":
            res = aggregate.digits(plan.items, nfe, latest, plan.extra["rules"])
        else:
            res = aggregate.wise(plan.items, nfe, latest, cfg.wise.protocol)
        res["coverage"] = aggregate.coverage(plan.items, nfe, latest, generated, gen_errors)
        per_nfe[str(nfe)] = res
    return {"benchmark": plan.name, "label": protocol_label(plan.name, plan.scorer), "checkpoint": str(ckpt),
            "pipeline": str(folder), "prompts": len(plan.items), "subset": cfg.limit > 0, "generation": gen,
            "scorer": plan.scorer, "nfe": per_nfe,
            "references": (digits_references(plan.extra["rules"]) if plan.name == "digits"
                           else references(plan.name, cfg.wise.protocol)),
            "pool": pools, "stage_errors": errors, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _grid_rows(cfg: EvalConfig, plan: Plan) -> list[tuple[str, list[Path]]]:
    items = plan.items[: cfg.grid_prompts]
    return [(f"NFE {nfe}", [layout.image_files(plan.name, plan.images(nfe), it, plan.n_images)[0] for it in items])
            for nfe in cfg.nfe]


def evaluate(cfg: EvalConfig, checkpoint: str | Path | None = None, hooks: Hooks | None = None) -> dict[str, dict]:
    """Evaluate one checkpoint on every configured benchmark and NFE; returns results per benchmark."""
    hooks = hooks or Hooks()
    # Only the file benchmarks need the benchmarks folder (digits makes its own prompts).
    data_root = resolve_data_root(cfg.data_root) if set(cfg.benchmarks) & set(FILE_BENCHMARKS) else None
    cfg = resolve_model_names(dataclasses.replace(cfg, checkpoint=str(checkpoint or cfg.checkpoint)), data_root)
    ckpt = Path(cfg.checkpoint)
    check_checkpoint_files(ckpt)
    folder = resolve_pipeline_folder(ckpt)
    out = Path(cfg.output_dir) if cfg.output_dir else ckpt / "eval"
    plans = [plan_benchmark(b, cfg, data_root, out) for b in cfg.benchmarks]
    gens = {p.name: _generation_settings(cfg, p, folder) for p in plans}
    for p in plans:
        _check_settings(cfg, p, gens[p.name])
    ensure_ray(cfg)
    device = resolve_device(cfg)
    log.info("evaluating %s on %s (%s), NFE %s, device %s", folder, ", ".join(cfg.benchmarks),
             "all prompts" if not cfg.limit else f"first {cfg.limit} prompts", cfg.nfe, device)
    errors: dict[str, list[str]] = {p.name: [] for p in plans}
    pools: dict[str, dict] = {p.name: {} for p in plans}
    regenerated: set = set()
    try:
        gen_stats, regenerated = run_generation(cfg, plans, folder, device, hooks)
        for p in plans:
            pools[p.name]["generate"] = gen_stats
    except StageError as exc:
        for p in plans:
            errors[p.name].append(str(exc))
    def score(p: Plan) -> None:
        try:
            pools[p.name]["score"] = run_scoring(cfg, p, device, regenerated, hooks)
        except StageError as exc:
            errors[p.name].append(str(exc))

    # Each benchmark is its own stage with its own actors and resources; side by side they overlap
    # model loading and keep every eval GPU busy (a stage waits for resources, never deadlocks).
    if cfg.pool.concurrent_scoring and len(plans) > 1:
        with ThreadPoolExecutor(len(plans)) as ex:
            list(ex.map(score, plans))
    else:
        for p in plans:
            score(p)
    results = {}
    for p in plans:
        results[p.name] = summarize(cfg, p, ckpt, folder, gens[p.name], pools[p.name], errors[p.name])
        write_reports(p.out, p.name, results[p.name], _grid_rows(cfg, p))
    from evals.report import markdown

    (out / "summary.md").write_text("\n".join(markdown(b, r) for b, r in results.items()))
    return results


def watch(cfg: EvalConfig, hooks: Hooks | None = None, sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Evaluate each new checkpoint under ``cfg.watch_dir`` as training writes it; returns {ckpt: status}."""
    run_dir = Path(cfg.watch_dir)
    state = WatchState(run_dir)
    done: dict[str, str] = {}
    while True:
        pending = [c for c in discover(run_dir, cfg.watch.settle_s) if not state.done(c)]
        for ckpt in pending:
            one = dataclasses.replace(cfg, checkpoint=str(ckpt), watch_dir="", output_dir="")
            try:
                evaluate(one, ckpt, hooks)
                state.mark(ckpt, "evaluated")
            except NeedsConversion as exc:
                log.warning("%s", exc)
                state.mark(ckpt, "needs_conversion", str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not stop the watcher
                log.exception("evaluating %s failed", ckpt)
                state.mark(ckpt, "error", f"{type(exc).__name__}: {exc}")
            done[str(ckpt)] = state.entries[str(ckpt)]["status"]
            if cfg.watch.max_checkpoints and len(done) >= cfg.watch.max_checkpoints:
                return done
        if not pending and cfg.watch.exit_when_idle:
            return done
        sleep(cfg.watch.poll_s)
