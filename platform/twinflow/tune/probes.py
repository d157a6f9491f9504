"""In-training quality probes that trials report at ASHA's rungs, next to the loss.

The loss of a TwinFlow run is a poor stopping signal: λ changes which blocks the loss averages
over, so losses of different λ are not comparable, and a run can lower its loss while its 1-NFE
samples collapse. The probes score what the sweep is after, one-step sample quality:

  digits  ``DigitsProbe``: 1-NFE samples (the study's few-step sampler) from a fixed noise batch
          with fixed labels, scored by the study's DigitsJudge (study/metrics.py) -> frechet_1nfe,
          recall_1nfe, precision_1nfe, accuracy_1nfe, nonfinite_1nfe.
  qwen    ``probe.kind: nfe_gap`` of the training job (train/config.py ProbeSettings): 1-NFE vs
          16-step ODE sample discrepancy on the fixed sample prompts × seeds -> nfe_gap_mse.

``DigitsProbe`` is handed to the study's worker loop (study/ray_job.py ``config["probe"]``), which
builds it on rank 0 and calls it with the sampling network (EMA weights) at every log step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

DIGITS_METRICS = ("frechet_1nfe", "recall_1nfe", "precision_1nfe", "accuracy_1nfe", "nonfinite_1nfe")


@dataclass
class DigitsProbe:
    samples_per_class: int = 50
    """Generated digits per class (10 classes); the same noise and labels at every call."""
    seed: int = 0

    def build(self, data) -> Callable[[torch.nn.Module], dict[str, float]]:
        from twinflow.method.sampler import few_step, sample
        from twinflow.study.datasets import Digits
        from twinflow.study.metrics import DigitsJudge

        if not isinstance(data, Digits):
            raise ValueError(f"DigitsProbe scores digits, got {type(data).__name__}")
        judge = DigitsJudge.fit(data)
        labels = torch.arange(data.num_classes).repeat_interleave(self.samples_per_class)
        noise = torch.randn(len(labels), data.data_dim, generator=torch.Generator().manual_seed(self.seed))
        sampler = few_step(1)
        seed = self.seed

        def probe(net: torch.nn.Module) -> dict[str, float]:
            x = sample(net, noise, labels, sampler, torch.Generator().manual_seed(seed + 1))
            return score_digits(judge, x, labels)

        return probe


def score_digits(judge, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """DigitsJudge metrics of generated digits, suffixed ``_1nfe``. A diverged network's non-finite
    pixels become 0 (then the judge clips to [−1, 1] as for any sample): the images are scored as the
    garbage they are, never skipped, and ``nonfinite_1nfe`` says how many rows had them."""
    finite = torch.isfinite(x).all(dim=1)
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    scores = judge.score(x.numpy().astype(np.float64), labels.numpy())
    out = {f"{k}_1nfe": float(scores[k]) for k in ("frechet", "recall", "precision", "accuracy")}
    out["nonfinite_1nfe"] = float(1.0 - finite.float().mean())
    return out
