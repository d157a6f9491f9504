"""Connecting a job's driver to Ray so that every worker runs the same ``twinflow`` code.

Ray workers import our functions by module name. ``ray job submit --working-dir .`` puts the repo
root on their path, but the package lives one level down (platform/twinflow; a platform/__init__.py
would shadow the standard library), so the driver ships ``twinflow`` (and ``evals``) as
``py_modules``: Ray uploads them once and every node's workers import exactly the submitted code,
also where an older copy is installed in the image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import twinflow

_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def code_modules() -> list[str]:
    pkg = Path(twinflow.__file__).resolve().parent
    mods = [str(pkg)]
    evals_dir = pkg.parents[1] / "evals"
    if (evals_dir / "__init__.py").is_file():
        mods.append(str(evals_dir))
    return mods


def _job_defines_py_modules() -> bool:
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return False
    try:
        return bool((json.loads(raw).get("runtime_env") or {}).get("py_modules"))
    except (ValueError, AttributeError):
        return False


def connect(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster at RAY_ADDRESS / a running local one, else start a local Ray; idempotent.

    RAY_ADDRESS=local forces a fresh local instance even when another cluster runs on the machine.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env = None if _job_defines_py_modules() else {"py_modules": code_modules()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=num_cpus if os.environ["RAY_ADDRESS"] == "local" else None, runtime_env=runtime_env,
                 log_to_driver=log_to_driver)
        return
    try:
        ray.init(address="auto", runtime_env=runtime_env, log_to_driver=log_to_driver)
    except ConnectionError:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=log_to_driver)
