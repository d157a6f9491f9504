"""A rank's endless stream of micro-batches, epoch after epoch, that can resume mid-epoch.

The dataset reaches the worker as ``ray.train.get_dataset_shard("train")`` (an equal
``streaming_split``; the driver sets ``preserve_order`` so the same rows reach the same rank in
the same order every epoch and after every restart, see train/trainer.py). The position is
(epoch, micro-batch index in the epoch); a resumed run skips that many *raw* batches, without
decoding or encoding them, and continues with exactly the batch the interrupted run would have
used next.

Memory epochs (``spec.memory_epochs``, small latent caches): epoch 0 streams and keeps this rank's
rows; every later epoch replays them from memory in the order of a permutation seeded by (run
seed, rank, epoch), so a resumed run at (epoch, index) rebuilds exactly the same batches (after
one streamed pass to refill memory) and Ray Data is not restarted every few steps.

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
                 world: int = 1, rank: int = 0, seed: int = 0):
        self.shard = shard
        self.spec = spec
        self.device = device
        self.world = world
        self.rank = rank
        self.seed = seed
        self._kept: list[dict] | None = [] if spec.memory_epochs else None
        """memory epochs: the grouped rows of epoch 0 (while it streams), then all of them as columns."""
        self._memory: dict[str, list] | None = None
        self.epoch = epoch
        self.index = index
        """Index in the epoch of the next micro-batch."""
        self.wait_s = 0.0
        """Seconds spent waiting for data (reading, decoding, encoding) since the last ``take_wait``."""
        self._rows: Iterator[dict] | None = None

    def _stream(self, keep: bool = False) -> Iterator[dict]:
        raw = self.shard.iter_batches(batch_size=self.spec.batch_size, batch_format="numpy",
                                      drop_last=self.spec.drop_last, prefetch_batches=self.spec.prefetch_batches)
        for rows in iter_rows_by_shape(raw, self.spec.batch_size, self.spec.kind):
            if keep:
                self._kept.append(rows)
            yield rows

    def _replayed(self) -> Iterator[dict]:
        """Epoch ``self.epoch`` from memory: the kept rows in a seeded order, whole micro-batches only."""
        if self._memory is None:  # resumed after epoch 0: stream it once more to refill memory
            self._memory = _columns(list(self._stream()))
        n = len(next(iter(self._memory.values())))
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank * 7_919 + self.epoch) % 2**63)
        order = torch.randperm(n, generator=gen).tolist()
        size = self.spec.batch_size
        for start in range(0, n - size + 1, size):
            idx = order[start:start + size]
            yield {k: [col[i] for i in idx] for k, col in self._memory.items()}

    def _open(self) -> None:
        if self._kept is not None and self.epoch >= 1:
            self._rows = self._replayed()
        else:  # epoch 0 of memory epochs keeps what it streams (skipped batches of a resume included)
            self._rows = self._stream(keep=self._kept is not None and self._memory is None)
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
        if self._kept is not None and self.epoch == 0 and self._memory is None:
            self._memory = _columns(self._kept)
            self._kept = []
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
            # Replayed epochs come from memory on every rank at once (same epoch, same index, no I/O):
            # nothing can fail or end early there, so the collective is skipped.
            replaying = self._kept is not None and self.epoch >= 1 and not self.spec.equalize
            if (flag == HAVE and replaying) or self._agree(flag, error) == HAVE:
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


def _columns(batches: list[dict]) -> dict[str, list]:
    """Grouped row batches -> one list per column (the rows of a whole epoch)."""
    if not batches:
        raise DataStopped("memory epochs: the first epoch of this rank's data held no full micro-batch")
    return {k: [v for b in batches for v in b[k]] for k in batches[0]}
