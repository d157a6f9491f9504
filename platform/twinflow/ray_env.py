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
import re
import sys
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


def connect(num_cpus: int | None = None, log_to_driver: bool = True, address: str | None = None) -> None:
    """Connect the driver to Ray; idempotent.

    Which Ray, in order:
      ``address`` (a job's ``--address``, evals' ``pool.ray_address``): that cluster; ``auto`` joins a
          cluster already running on this machine (``ray start``);
      ``RAY_ADDRESS`` (set by ``ray job submit`` for the job's driver, or by the user): that cluster;
      otherwise a fresh local instance of this process's own (never someone else's running cluster,
          which plain ``ray.init()`` would silently join and die with).
    """
    import ray

    if ray.is_initialized():
        return
    setup_process()
    runtime_env = {"worker_process_setup_hook": "twinflow.ray_env.setup_process"}
    if not _job_defines_py_modules():
        runtime_env["py_modules"] = code_modules()
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target == "local":
        # Ray 2.60 turns token auth on for a new local instance and warns that it did, on every run;
        # asking for it explicitly keeps it on (a token is generated once in ~/.ray) without the warning.
        _request_token_auth()
    ray.init(address=target, num_cpus=num_cpus if target == "local" else None, runtime_env=runtime_env,
             log_to_driver=log_to_driver)


def _request_token_auth() -> None:
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user's choice
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; refresh it as Ray itself does when it enables token auth
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001 - a Ray without it reads the variable at init
        pass


# Warnings every run prints that a user of these jobs cannot act on; each is filtered by its exact text.
_UNACTIONABLE = (
    "`ExecutionOptions.exclude_resources` is deprecated",  # Ray Train's own DataConfig sets the field
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # DeepSpeed ZeRO's collectives
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
)


def setup_process() -> None:
    """In the driver and (``worker_process_setup_hook``) in every Ray worker process of the job: drop the
    deprecation warnings Ray's and DeepSpeed's own code triggers (nothing in a job's config causes
    them), and Ray Data's traceback for our own data errors (the job reports those in one line)."""
    import logging
    import warnings

    for text in _UNACTIONABLE:
        warnings.filterwarnings("ignore", message=re.escape(text))
    for name in _DATA_ERROR_LOGGERS:  # a filter acts on records of its own logger, not of children
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OwnDataErrors) for f in logger.filters):
            logger.addFilter(_OwnDataErrors())


# The Ray Data modules that log a failed task's exception with its traceback.
_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state",
                       "ray.data._internal.execution.streaming_executor", "ray.data.exceptions")


class _OwnDataErrors:
    """A logging filter: drop Ray Data's report (with traceback) of a task that raised BadDataError."""

    def filter(self, record) -> bool:
        from twinflow.data.ingest import find_bad_data_error

        # Records logged inside an except block without exc_info still see the exception being handled.
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or find_bad_data_error(exc) is None
