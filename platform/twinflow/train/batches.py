"""A rank's endless stream of micro-batches, epoch after epoch, that can resume mid-epoch.

The dataset reaches the worker as ``ray.train.get_dataset_shard("train")`` (an equal
``streaming_split``; the driver sets ``preserve_order`` so the same rows reach the same rank in
the same order every epoch and after every restart, see train/trainer.py). The position is
(epoch, micro-batch index in the epoch); a resumed run skips that many *raw* batches, without
decoding or encoding them, and continues with exactly the batch the interrupted run would have
used next.

Batches follow the data layer's training-batch contract (twinflow.data.loader): a latent cache
is decoded, raw image-text rows are encoded here by the pipeline's own VAE and text encoder
(``cached_encoder``, small models only).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from twinflow.data.loader import BatchSpec, all_ranks_have_batch, iter_rows_by_shape, to_training_batch


class MicroBatches:
    def __init__(self, shard, spec: BatchSpec, device: torch.device, epoch: int = 0, index: int = 0):
        self.shard = shard
        self.spec = spec
        self.device = device
        self.epoch = epoch
        self.index = index
        """Index in the epoch of the next micro-batch."""
        self.wait_s = 0.0
        """Seconds spent waiting for data (reading, decoding, encoding) since the last ``take_wait``."""
        self._rows: Iterator[dict] | None = None

    def _open(self) -> None:
        raw = self.shard.iter_batches(batch_size=self.spec.batch_size, batch_format="numpy",
                                      drop_last=self.spec.drop_last, prefetch_batches=self.spec.prefetch_batches)
        self._rows = iter_rows_by_shape(raw, self.spec.batch_size, self.spec.kind)
        for skipped in range(self.index):
            if next(self._rows, None) is None:
                raise RuntimeError(f"resuming at micro-batch {self.index} of epoch {self.epoch}, but this rank's "
                                   f"shard has only {skipped} batches per epoch: the data changed since the checkpoint")

    def _next_rows(self) -> dict | None:
        rows = next(self._rows, None)
        if self.spec.equalize and not all_ranks_have_batch(rows is not None):
            return None
        return rows

    def next(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        while True:
            if self._rows is None:
                self._open()
            rows = self._next_rows()
            if rows is not None:
                break
            if self.index == 0:
                raise RuntimeError(f"this rank's data shard holds no full micro-batch of {self.spec.batch_size} rows; "
                                   f"add data or lower deepspeed.micro_batch_per_gpu")
            self.epoch += 1
            self.index = 0
            self._rows = None
        batch = to_training_batch(rows, self.spec)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.index += 1
        self.wait_s += time.perf_counter() - t0
        return batch

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w
