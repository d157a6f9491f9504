"""A fault-tolerant pool of Ray actors that works through shards of tasks.

Why not ``ray.util.ActorPool`` or Ray Data ``map_batches``: the pool must (a) hand each finished
shard to the driver at once, so records are appended to disk as they arrive and a rerun resumes,
(b) notice an actor that died, replace it and retry exactly the shard it held, with a bounded
number of tries, and (c) turn a shard that keeps failing into explicit "failed" records rather than
dropping it. Those three are a few dozen lines over ``ray.wait``.

Each stage builds its own pool with its own actor class and resources: on GPU clusters an actor
asks for ``num_gpus`` and the same amount of the custom resource ``twinflow_eval`` (so scoring
lands on the eval node type, never on training nodes); in CPU mode it asks for CPUs only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger("evals.pool")


class StageError(RuntimeError):
    """A stage could not run at all (its actors fail to start, or no node offers its resources)."""


@dataclass
class PoolStats:
    shards: int = 0
    tasks: int = 0
    actor_deaths: int = 0
    task_errors: int = 0
    retried_shards: int = 0
    failed_shards: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("shards", "tasks", "actor_deaths", "task_errors", "retried_shards",
                                              "failed_shards", "seconds")} | {"errors": self.errors[:10]}


def actor_options(device: str, num_cpus: float, num_gpus: float, eval_resource: str,
                  runtime_env: dict | None = None) -> dict[str, Any]:
    """Ray actor options for one stage: GPU + twinflow_eval on GPU pools, CPUs only otherwise."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": 0, "max_concurrency": 1}
    if device == "cuda" and num_gpus > 0:
        opts["num_gpus"] = num_gpus
        if eval_resource:
            opts["resources"] = {eval_resource: num_gpus}
    if runtime_env:
        opts["runtime_env"] = runtime_env
    return opts


def check_resources(opts: dict[str, Any], stage: str) -> None:
    """Fail fast (instead of hanging) when no node could ever host this stage's actors."""
    import ray

    total = ray.cluster_resources()
    need = {"CPU": opts.get("num_cpus", 0), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
    for name, amount in need.items():
        if amount and total.get(name, 0) < amount:
            hint = (f"; start eval nodes with --resources '{{\"{name}\": <GPUs>}}' or --set pool.eval_resource=''"
                    if name not in ("CPU", "GPU") else "")
            raise StageError(f"{stage}: the cluster offers {total.get(name, 0)} {name}, an actor needs {amount}{hint}")


ResultFn = Callable[[Sequence[Any], list[dict], "ShardPool"], None]
FailFn = Callable[[Any, str], dict]


class ShardPool:
    """Run ``actor.process(shard)`` for every shard on ``num_actors`` actors of ``actor_cls``.

    ``on_result(shard, records, pool)`` is called on the driver as each shard finishes (write it to
    disk there). ``make_failed(task, error)`` builds the record for a task whose shard failed
    ``max_attempts`` times. Actor deaths are retried on a fresh actor; a shard that raises inside the
    actor is retried too. ``shard_timeout_s`` > 0 treats a shard running longer as a hung actor.
    """

    def __init__(self, name: str, actor_cls: type, init_args: tuple, options: dict[str, Any], num_actors: int,
                 max_attempts: int = 3, shard_timeout_s: float = 0.0):
        self.name = name
        self.actor_cls = actor_cls
        self.init_args = init_args
        self.options = options
        self.num_actors = num_actors
        self.max_attempts = max_attempts
        self.shard_timeout_s = shard_timeout_s
        self.actors: list[Any] = []
        self.stats = PoolStats()

    def _spawn(self):
        import ray

        return ray.remote(self.actor_cls).options(**self.options).remote(*self.init_args)

    def busy_actors(self) -> list[Any]:
        """Handles of the actors working on a shard right now (a snapshot, for progress and tests)."""
        return [self.actors[slot] for slot, *_ in list(getattr(self, "_inflight", {}).values())
                if slot < len(self.actors)]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.actors = []

    def run(self, shards: Sequence[Sequence[Any]], on_result: ResultFn, make_failed: FailFn,
            prepare: Callable[[Sequence[Any]], list] | None = None) -> PoolStats:
        """Process every shard; returns the stage's statistics.

        ``prepare(shard)`` builds the payload sent to the actor at dispatch time (e.g. reads the
        images), so only the shards in flight are ever held in memory.

        Shards go only to actors whose ``ready()`` has returned, i.e. whose model is loaded. Actors
        the cluster cannot place yet simply join later; a stage never parks a shard on an unplaced
        actor, so two stages sharing a GPU pool cannot wait on each other. If the first actor to
        report fails to load, the stage stops with one clear ``StageError``.
        """
        import ray

        t_start = time.time()
        self.stats = PoolStats(shards=len(shards), tasks=sum(len(s) for s in shards))
        if not shards:
            return self.stats
        check_resources(self.options, self.name)
        self.actors = [self._spawn() for _ in range(min(self.num_actors, len(shards)))]
        starting: dict[Any, int] = {a.ready.remote(): i for i, a in enumerate(self.actors)}  # ref -> slot
        queue: deque[tuple[int, int]] = deque((i, 1) for i in range(len(shards)))
        inflight: dict[Any, tuple[int, int, int, float]] = {}  # ref -> (actor slot, shard, attempt, start)
        self._inflight = inflight
        idle: list[int] = []
        any_ready = False
        replacements_left = self.max_attempts * max(1, len(self.actors))

        def replace(slot: int, exc: BaseException) -> None:
            nonlocal replacements_left
            self.stats.actor_deaths += 1
            if replacements_left <= 0:
                raise StageError(f"{self.name}: actors keep dying ({self.stats.actor_deaths} deaths); "
                                 f"last: {_cause(exc)}") from exc
            replacements_left -= 1
            try:
                ray.kill(self.actors[slot], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.actors[slot] = self._spawn()
            starting[self.actors[slot].ready.remote()] = slot

        try:
            while queue or inflight:
                while queue and idle:
                    slot = idle.pop(0)
                    s, attempt = queue.popleft()
                    payload = prepare(shards[s]) if prepare else list(shards[s])
                    inflight[self.actors[slot].process.remote(payload)] = (slot, s, attempt, time.time())
                timeout = None
                if self.shard_timeout_s > 0 and inflight:
                    oldest = min(v[3] for v in inflight.values())
                    timeout = max(0.1, self.shard_timeout_s - (time.time() - oldest))
                done, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=timeout)
                if not done:  # a shard overran: treat its actor as hung (its task then fails as a death)
                    for ref, (slot, s, attempt, t0) in list(inflight.items()):
                        if time.time() - t0 >= self.shard_timeout_s:
                            ray.kill(self.actors[slot], no_restart=True)
                    continue
                ref = done[0]
                if ref in starting:
                    slot = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        if not any_ready:  # the model cannot load: one clear error, not n retries
                            raise StageError(f"{self.name}: actors failed to start: {_cause(exc)}") from exc
                        self.stats.errors.append(f"actor {slot} failed to start: {_cause(exc)}")
                        replace(slot, exc)
                        continue
                    any_ready = True
                    idle.append(slot)
                    continue
                slot, s, attempt, _ = inflight.pop(ref)
                try:
                    records = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the actor lives; the shard raised
                    self.stats.task_errors += 1
                    self.stats.errors.append(f"shard {s} raised (attempt {attempt}): {_cause(exc)}")
                    idle.append(slot)
                    self._retry_or_fail(queue, shards, s, attempt, f"scorer raised: {_cause(exc)}", on_result, make_failed)
                    continue
                except ray.exceptions.RayError as exc:  # died, OOM-killed, node lost: a new actor retries
                    self.stats.errors.append(f"actor died on shard {s} (attempt {attempt}): {_cause(exc)}")
                    log.warning("%s: actor %d died on shard %d (attempt %d); replacing it", self.name, slot, s, attempt)
                    replace(slot, exc)
                    self._retry_or_fail(queue, shards, s, attempt, f"actor died: {_cause(exc)}", on_result, make_failed)
                    continue
                idle.append(slot)
                on_result(shards[s], self._complete(shards[s], records, make_failed), self)
        finally:
            self.shutdown()
            self.stats.seconds = round(time.time() - t_start, 3)
        return self.stats

    def _retry_or_fail(self, queue, shards, s, attempt, error, on_result, make_failed) -> None:
        if attempt < self.max_attempts:
            self.stats.retried_shards += 1
            queue.append((s, attempt + 1))
        else:
            self.stats.failed_shards += 1
            on_result(shards[s], [make_failed(t, f"{error} (after {attempt} attempts)") for t in shards[s]], self)

    @staticmethod
    def _complete(shard: Sequence[Any], records: list[dict], make_failed: FailFn) -> list[dict]:
        """Guarantee one record per task: a task the actor did not answer becomes a failed record."""
        if len(records) == len(shard):
            return records
        seen = {(r.get("nfe"), r.get("key")) for r in records}
        extra = [make_failed(t, "actor returned no record for this task") for t in shard
                 if (_get(t, "nfe"), _get(t, "key")) not in seen]
        return records + extra


def _get(task: Any, name: str) -> Any:
    if isinstance(task, dict):
        return task.get(name)
    if name == "key" and hasattr(task, "item"):
        return task.item.key
    return getattr(task, name, None)


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]
