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

Bad data: a shard over ``data.bad_share_limit`` stops the Ray Data pipeline with BadDataError. The
ranks learn it together: before every micro-batch they all-reduce (MIN) one flag, 2 = "I have a
batch", 1 = "my epoch ended" (only consulted with ``spec.equalize``), 0 = "my data failed", and on 0
every rank raises ``DataStopped`` with the failing rank's message, so no rank is left waiting in the
next collective and the run ends with that one line instead of a retried worker failure.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from twinflow.data.ingest import find_bad_data_error
from twinflow.data.loader import BatchSpec, iter_rows_by_shape, to_training_batch

HAVE, ENDED, FAILED = 2, 1, 0


class DataStopped(RuntimeError):
    """The training data cannot be used (raised on every rank together)."""


class MicroBatches:
    def __init__(self, shard, spec: BatchSpec, device: torch.device, epoch: int = 0, index: int = 0,
                 world: int = 1):
        self.shard = shard
        self.spec = spec
        self.device = device
        self.world = world
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

    def _fetch(self) -> tuple[dict | None, str | None]:
        """This rank's next grouped rows (None at its epoch end), or the bad-data message."""
        try:
            if self._rows is None:
                self._open()
            return next(self._rows, None), None
        except Exception as exc:  # noqa: BLE001 - only bad data is ours to explain; anything else re-raises
            bad = find_bad_data_error(exc)
            if bad is None:
                raise
            return None, str(bad).splitlines()[0]

    def _agree(self, flag: int, error: str | None) -> int:
        """MIN of the ranks' flags; on FAILED, DataStopped with the first failing rank's message."""
        if self.world > 1:
            import torch.distributed as dist

            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([flag], dtype=torch.int32, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            agreed = int(t.item())
            if agreed == FAILED:
                box: list = [None] * self.world
                dist.all_gather_object(box, error)
                error = next(e for e in box if e)
        else:
            agreed = flag
        if agreed == FAILED:
            raise DataStopped(error)
        return agreed

    def _end_epoch(self) -> str | None:
        if self.index == 0:
            return (f"this rank's data shard holds no full micro-batch of {self.spec.batch_size} rows; add data or "
                    f"lower deepspeed.micro_batch_per_gpu")
        self.epoch += 1
        self.index = 0
        self._rows = None
        return None

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch; exactly one agreement collective per call (more only at a bucketed
        epoch end, where every rank takes part), so ranks never fall out of step."""
        t0 = time.perf_counter()
        while True:
            rows, error = self._fetch()
            if rows is None and error is None and not self.spec.equalize:
                # Equal splits end every rank's epoch at the same micro-batch: roll over locally.
                error = self._end_epoch()
                if error is None:
                    rows, error = self._fetch()
                    if rows is None and error is None:
                        error = self._end_epoch()  # a whole epoch without one micro-batch: the error
            flag = FAILED if error else (HAVE if rows is not None else ENDED)
            if self._agree(flag, error) == HAVE:
                break
            error = self._end_epoch()  # equalize: some rank's bucketed epoch ended, so every rank's does
            if error:
                raise DataStopped(error)
        batch = to_training_batch(rows, self.spec)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.index += 1
        self.wait_s += time.perf_counter() - t0
        return batch

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w
