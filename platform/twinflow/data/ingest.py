"""Raw image-text shards -> a Ray Dataset of decoded rows, with every skipped sample counted.

Pipeline: ``from_items(shard descriptors)`` -> ``map_batches(decode, batch_size=1)``, one task per
shard (a generator: rows stream out in blocks of ``data.decode_batch_rows``). Rows are
``{"key": str, "shard": str, "image": uint8 [H, W, 3], "text": str}``; with crop=buckets the
image shapes differ between rows (Ray stores them as a variable-shaped tensor column).

Counting: each shard's ShardStats (seen, ok, skipped per reason) is logged and, when a ledger
actor is passed, reported to it, so the driver can print/record totals. A shard whose skipped
share exceeds ``data.bad_share_limit`` raises BadDataError naming the shard; it surfaces on the
driver (or in the Train worker iterating the shard) and stops the job.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from twinflow.data.config import DatasetConfig
from twinflow.data.fs import filesystem_for
from twinflow.data.sources import BadDataError, Shard, iter_samples, list_shards
from twinflow.data.transforms import SkipSample, clean_caption, decode_image

log = logging.getLogger("twinflow.data")


@dataclass
class ShardStats:
    shard: str
    uri: str
    seen: int = 0
    ok: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def bad(self) -> int:
        return self.seen - self.ok

    def to_dict(self) -> dict:
        return {"shard": self.shard, "uri": self.uri, "seen": self.seen, "ok": self.ok, "skipped": dict(self.skipped)}

    @staticmethod
    def from_dict(d: dict) -> "ShardStats":
        return ShardStats(shard=d["shard"], uri=d["uri"], seen=d["seen"], ok=d["ok"], skipped=dict(d["skipped"]))


def check_bad_share(stats: ShardStats, limit: float) -> None:
    """Raise BadDataError naming the shard when its skipped share exceeds ``limit``."""
    if stats.seen == 0:
        raise BadDataError(f"shard {stats.uri}: contains no samples; remove it from the source")
    share = stats.bad / stats.seen
    if share > limit:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
        raise BadDataError(f"shard {stats.uri}: {stats.bad} of {stats.seen} samples unusable ({share:.1%}: "
                           f"{reasons}) exceeds data.bad_share_limit={limit}; fix or remove the shard, "
                           f"or raise data.bad_share_limit")


def summarize(stats: list[ShardStats] | list[dict]) -> dict:
    """Totals over shards: {"shards", "seen", "ok", "skipped": {reason: n}}."""
    items = [s if isinstance(s, ShardStats) else ShardStats.from_dict(s) for s in stats]
    skipped: Counter = Counter()
    for s in items:
        skipped.update(s.skipped)
    return {"shards": len(items), "seen": sum(s.seen for s in items), "ok": sum(s.ok for s in items),
            "skipped": dict(sorted(skipped.items()))}


def decode_shard(shard: Shard, cfg: DatasetConfig, fs, stats: ShardStats) -> Iterator[tuple[str, np.ndarray, str]]:
    """(key, uint8 image, caption) for the usable samples of a shard; ``stats`` is filled as it goes."""
    for key, image_bytes, caption in iter_samples(shard, cfg, fs):
        stats.seen += 1
        try:
            text = clean_caption(caption)  # the cheap check first: skip decoding caption-less rows
            image = decode_image(image_bytes, cfg)
        except SkipSample as skip:
            stats.skipped[skip.reason] = stats.skipped.get(skip.reason, 0) + 1
            continue
        stats.ok += 1
        yield key, image, text


def rows_to_batch(rows: list[tuple[str, np.ndarray, str]], shard_id: str) -> dict:
    keys, images, texts = zip(*rows)
    if all(im.shape == images[0].shape for im in images):
        image_col = np.stack(images)
    else:  # buckets: a ragged column
        image_col = np.empty(len(images), dtype=object)
        image_col[:] = list(images)
    return {"key": np.array(keys, dtype=object), "shard": np.array([shard_id] * len(rows), dtype=object),
            "image": image_col, "text": np.array(texts, dtype=object)}


def _decode_shards_udf(batch: dict, *, cfg: DatasetConfig, fs, ledger) -> Iterator[dict]:
    """Ray Data UDF: one shard descriptor in, decoded row blocks out (a generator)."""
    import ray

    for descriptor in batch["shard"]:
        shard = Shard.from_json(descriptor)
        stats = ShardStats(shard=shard.id, uri=shard.uri)
        rows: list = []
        for row in decode_shard(shard, cfg, fs, stats):
            rows.append(row)
            if len(rows) >= cfg.decode_batch_rows:
                yield rows_to_batch(rows, shard.id)
                rows = []
        if rows:
            yield rows_to_batch(rows, shard.id)
        log.info("shard %s: %d seen, %d ok, skipped %s", shard.uri, stats.seen, stats.ok, stats.skipped)
        if ledger is not None:
            ray.get(ledger.report.remote(stats.to_dict()))
        check_bad_share(stats, cfg.bad_share_limit)


class _Ledger:
    """Collects ShardStats from decode tasks (a Ray actor: tasks report, the driver reads)."""

    def __init__(self):
        self._stats: dict[str, dict] = {}

    def report(self, stats: dict) -> None:
        self._stats[stats["shard"]] = stats

    def get(self, shard_ids: list[str]) -> dict[str, dict | None]:
        return {i: self._stats.get(i) for i in shard_ids}

    def all(self) -> list[dict]:
        return list(self._stats.values())


def new_ledger():
    """A ShardLedger actor handle: pass it to read_image_text, then ``ray.get(ledger.all.remote())``."""
    import ray

    return ray.remote(num_cpus=0)(_Ledger).remote()


def warn_missing_resources(resources: dict, field_name: str) -> list[str]:
    """Names in ``resources`` that no node of the cluster offers right now, with a warning.

    Ray queues such work as infeasible and waits silently (forever, unless an autoscaler adds a
    node type that has them), so say which config field asks for them.
    """
    import ray

    if not resources:
        return []
    have = ray.cluster_resources()
    missing = [name for name in resources if have.get(name, 0) <= 0]
    if missing:
        print(f"warning: {field_name} asks for Ray resources {missing} that no node offers; the work waits until "
              f"such nodes join (set {field_name}={{}} to run anywhere)", file=sys.stderr, flush=True)
    return missing


def read_image_text(cfg: DatasetConfig, *, filesystem=None, shards: list[Shard] | None = None, ledger=None):
    """A Ray Dataset of decoded rows {key, shard, image uint8 HWC, text} from a raw source.

    ``filesystem`` overrides the one derived from ``cfg.source`` (see twinflow.data.fs);
    ``shards`` restricts the read (precache resume); ``ledger`` (new_ledger()) receives the counts.
    """
    import ray

    fs, root = filesystem_for(cfg.source, filesystem)
    if shards is None:
        shards = list_shards(cfg, fs, root)
    if not shards:
        raise BadDataError(f"{cfg.source}: nothing to read (no shards)")
    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards))
    remote_args: dict = {"num_cpus": cfg.decode_num_cpus}
    if cfg.decode_resources:
        remote_args["resources"] = dict(cfg.decode_resources)
        warn_missing_resources(cfg.decode_resources, "data.decode_resources")
    return ds.map_batches(_decode_shards_udf, batch_size=1, fn_kwargs={"cfg": cfg, "fs": fs, "ledger": ledger},
                          **remote_args)


def iter_decoded(cfg: DatasetConfig, *, filesystem=None, shards: list[Shard] | None = None,
                 stats_out: list | None = None) -> Iterator[tuple[str, np.ndarray, str]]:
    """The same rows without Ray, in this process (small evals, debugging, tests of exact values).

    ``stats_out`` (a list) receives each shard's ShardStats; the bad-share limit applies as in Ray.
    """
    fs, root = filesystem_for(cfg.source, filesystem)
    for shard in shards if shards is not None else list_shards(cfg, fs, root):
        stats = ShardStats(shard=shard.id, uri=shard.uri)
        yield from decode_shard(shard, cfg, fs, stats)
        if stats_out is not None:
            stats_out.append(stats)
        check_bad_share(stats, cfg.bad_share_limit)


def find_bad_data_error(exc: BaseException) -> BadDataError | None:
    """The original BadDataError inside an exception raised through Ray.

    Ray re-raises a task's error as a RayTaskError subclass of the original type whose message is
    the remote traceback; the original object is its ``cause``. Ray Data may wrap it once more.
    """
    seen = set()
    found = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BadDataError):
            found = exc  # keep going: a wrapper's message is a traceback, the cause's is ours
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return found
