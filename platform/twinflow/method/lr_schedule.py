"""Learning-rate multipliers: the one linear warm-up and cosine curve of both trainers.

Used by ``twinflow.train.ds_config.LrSchedule`` (DeepSpeed runs) and ``twinflow.study.trainer.lr_factor``
(the small-scale study). Plain math.

Counting: a torch ``LambdaLR`` calls its multiplier with s = 0 when it is built and with s = k after
the k-th optimizer step (``sched.step()`` after ``opt.step()``; DeepSpeed's ``engine.step`` does it
only for an applied step, not for one skipped on a non-finite gradient). So optimizer step k + 1
runs at lr · f(k): s is the number of optimizer steps already taken.
"""

from __future__ import annotations

import math


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps: (s + 1) / w, then 1.

    The first step (s = 0) runs at lr / w, never at 0, and the last step of the warm-up (s = w − 1)
    at the full lr; ``warmup_steps`` 0 (or 1) means none."""
    return min(1.0, (step + 1) / max(1, warmup_steps))


def cosine_factor(progress: float, floor: float = 0.0) -> float:
    """Half a cosine from 1 at ``progress`` 0 down to ``floor`` at 1 (``progress`` clamped to [0, 1])."""
    p = min(1.0, max(0.0, progress))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
