"""How many trials run at once: what one trial holds, and how many of those fit the cluster.

A trial is a Tune function trainable (the trial driver: a mostly idle process that builds and fits
a TorchTrainer) plus that trainer's worker group. What it holds while it runs:

    need[r] = num_workers × resources_per_worker[r]      for every resource r a worker asks for
              (+ GPU: 1 per worker when use_gpu is set and the workers name no GPU amount,
               Ray Train's default)
    need[CPU] += reserve_cpus                             CPU trials of the qwen target: one Ray Data
                                                          decode task per trial must still find a CPU
                                                          (ENVIRONMENT.md §5: otherwise it hangs)

and the trial driver asks for memory only (TRIAL_DRIVER), never for a CPU or GPU a worker could use.

    max_concurrent_trials = min over r in need of floor(capacity[r] / need[r])

``capacity`` is ``tune.capacity`` when set (an autoscaling cluster: the resources the sweep may use
once scaled up, e.g. {GPU: 16, twinflow_train: 16} for two 8-GPU nodes), else
``ray.cluster_resources()`` at the start. The 20B LoRA proxy with 8 GPUs per trial on two 8-GPU
nodes gives 2; the digits target with 1 one-CPU worker per trial on a 4-CPU laptop gives 4. A
needed resource the cluster does not have (yet) is an error that says which knob to set.
"""

from __future__ import annotations

import math

from twinflow.config.errors import ConfigError

TRIAL_DRIVER = {"memory": 256 * 2**20}
"""Resources of the trial driver process. Tune refuses an empty request ({"CPU": 0}); memory is
a real need of the driver and leaves every CPU to the workers."""


def per_trial_need(num_workers: int, resources_per_worker: dict[str, float], use_gpu: bool,
                   reserve_cpus: float = 0.0) -> dict[str, float]:
    need: dict[str, float] = {}
    for name, amount in resources_per_worker.items():
        if name == "memory":
            continue  # Ray's memory resource is not a sweep bottleneck worth modelling
        need[name] = num_workers * float(amount)
    if use_gpu and "GPU" not in need:
        need["GPU"] = float(num_workers)
    if reserve_cpus:
        need["CPU"] = need.get("CPU", 0.0) + reserve_cpus
    return {k: v for k, v in need.items() if v > 0}


def max_concurrent(need: dict[str, float], capacity: dict[str, float]) -> int:
    """min over needed resources of floor(capacity / need); ConfigError when one is missing."""
    if not need:
        raise ConfigError("the trials ask for no resources; set the target's resources_per_worker (e.g. {CPU: 1})")
    fits = []
    for name, amount in sorted(need.items()):
        have = float(capacity.get(name, 0.0))
        n = math.floor(have / amount + 1e-9)
        if n < 1:
            raise ConfigError(
                f"tune.capacity: one trial needs {name}={amount:g} but the cluster has {have:g} now; on an "
                f"autoscaling cluster set tune.capacity.{name} to what the sweep may use once scaled up, or "
                f"set tune.max_concurrent_trials")
        fits.append(n)
    return min(fits)


def cluster_capacity() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}
