"""The training data stream: deterministic, split by rank and worker, resumable to the exact sample.

How the stream is defined (and why a resumed run sees exactly the samples an uninterrupted run would):

- Each process (rank) runs ``W = max(1, num_workers)`` stream *roles*. Role ``r`` of rank ``k`` reads, in
  epoch ``e``, the shards ``perm_e[k::world][r::W]`` where ``perm_e`` is the manifest's shard list
  permuted by ``seed`` and ``e`` (so every epoch covers every shard once across the whole job). Its raw
  (undecoded) samples go through a shuffle buffer seeded by ``(seed, e, rank, r)`` and are cut into
  batches of ``batch_size``. Roles never end: after the last shard of epoch ``e`` comes epoch ``e+1``.
- Because no role ever runs dry, torch's DataLoader hands out the batches strictly round-robin: the
  rank's batch ``n`` comes from role ``n % W``. The data position is just ``n`` (batches consumed by this
  rank; the loop consumes ``grad_accum`` per step, so ``n = step * grad_accum``).
- A resumed run starting at batch ``n`` rotates the roles (DataLoader worker ``w`` plays role
  ``(w + n) % W``, so the first batch again comes from role ``n % W``) and every role drops its first
  already-consumed batches *before decoding them* (tar bytes only). Each batch carries its index, and the
  loop checks it, so a mismatch would be an error rather than a silent reshuffle.
- The randomness of a step's batch (which faces, their order, dropout flags) is drawn from a numpy
  Generator seeded by ``(seed, rank, n)``: nothing to save, identical after a resume.

A shard truncated mid-file, or a sample missing one of its files or failing to decode, is skipped and
reported (a ``SkipEvent`` travels with the next batch, and ``logging`` warns) instead of stopping the run.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from .config import TrainConfig
from .shards import FEATURES, IMAGE_KEYS, Manifest, Sample, ShardError, decode_sample

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("txt", "json", FEATURES)


@dataclass
class SkipEvent:
    """Something the stream skipped: a shard's unreadable tail or a sample that does not decode."""

    shard: str
    key: str
    reason: str

    def line(self) -> str:
        return f"skipped {self.key or '(rest of shard)'} in {self.shard}: {self.reason}"


@dataclass
class StreamItem:
    """One batch of the rank's stream: its index ``n``, the batch (or samples) and what was skipped."""

    index: int
    batch: Any
    skipped: list[SkipEvent] = field(default_factory=list)
    epoch: int = 0

    def pin_memory(self) -> "StreamItem":
        """Called by the DataLoader's pin-memory thread (CUDA), so the host-to-GPU copy can overlap."""
        if self.batch is not None and hasattr(self.batch, "pin_memory"):
            self.batch = self.batch.pin_memory()
        return self


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def epoch_shards(paths: list[str], seed: int, epoch: int, rank: int, world: int, role: int, roles: int) -> list[str]:
    """The shards role ``role`` of rank ``rank`` reads in ``epoch``."""
    order = _rng(seed, 0x5A4D, epoch).permutation(len(paths))
    return [paths[i] for i in order][rank::world][role::roles]


def _sample_problem(raw: dict) -> str | None:
    """Why a raw sample is unusable without decoding it (a truncated shard leaves partial samples)."""
    missing = [k for k in REQUIRED_KEYS if k not in raw] + ([] if any(k in raw for k in IMAGE_KEYS) else ["jpg|png"])
    return f"missing {missing}" if missing else None


def raw_samples(shards: list[str], events: list[SkipEvent]) -> Iterator[dict]:
    """Raw webdataset samples of ``shards`` in order; unreadable parts are appended to ``events``."""
    from webdataset.tariterators import tarfile_samples

    for shard in shards:
        seen: list[str] = []

        def handler(exn: Exception, shard: str = shard, seen: list[str] = seen) -> bool:
            # webdataset's tar reader and its expander both pass the same error up: report it once
            first = exn.args[0] if exn.args else exn
            reason = f"{type(exn).__name__}: {str(first).split(' @ ')[0]}"
            if reason not in seen:
                seen.append(reason)
                ev = SkipEvent(shard, "", reason)
                log.warning(ev.line())
                events.append(ev)
            return True  # go on with the next shard: the samples read before the damage are kept

        for raw in tarfile_samples([{"url": shard}], handler=handler):
            problem = _sample_problem(raw)
            if problem:
                ev = SkipEvent(shard, str(raw.get("__key__", "?")), problem)
                log.warning(ev.line())
                events.append(ev)
                continue
            raw["__url__"] = shard
            yield raw


def shuffled(items: Iterator[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style buffer shuffle (what webdataset's ``shuffle`` does, with our own seeded rng)."""
    buf: list[dict] = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    while buf:
        j = int(rng.integers(len(buf)))
        yield buf.pop(j)


@dataclass
class StreamSpec:
    """Everything a role needs (picklable: it travels to DataLoader workers)."""

    shards: list[str]
    seed: int
    rank: int
    world: int
    roles: int
    batch_size: int
    shuffle_buffer: int
    start_batch: int
    collate: Callable[[list[Sample], np.random.Generator], Any] | None = None


def role_stream(spec: StreamSpec, role: int) -> Iterator[StreamItem]:
    """Batches ``role, role + W, role + 2W, ...`` of the rank's stream, starting after ``start_batch``."""
    W = spec.roles
    # batches of this role that the run already consumed: indices n < start_batch with n % W == role
    skip = max(0, -(-(spec.start_batch - role) // W))
    k = 0                         # this role's batch counter
    events: list[SkipEvent] = []
    epoch = 0
    while True:
        shards = epoch_shards(spec.shards, spec.seed, epoch, spec.rank, spec.world, role, W)
        if not shards:
            raise ShardError(f"{len(spec.shards)} shard(s) cannot feed {spec.world} process(es) x {W} loader "
                             "worker(s): every worker needs a shard; lower num_workers or prepare more, smaller shards")
        got = 0
        pending: list[dict] = []
        for raw in shuffled(raw_samples(shards, events), spec.shuffle_buffer,
                            _rng(spec.seed, 0x5F, epoch, spec.rank, role)):
            got += 1
            pending.append(raw)
            if len(pending) < spec.batch_size:
                continue
            n = role + W * k
            k += 1
            batch_raw, pending = pending, []
            if k <= skip:
                continue  # consumed before the resume: dropped undecoded
            samples = []
            for r in batch_raw:
                try:
                    samples.append(decode_sample(r))
                except Exception as exn:  # noqa: BLE001 - a corrupt image or features blob: skip the sample, keep going
                    ev = SkipEvent(r.get("__url__", "?"), str(r.get("__key__", "?")), f"{type(exn).__name__}: {exn}")
                    log.warning(ev.line())
                    events.append(ev)
            # an all-corrupt batch still yields (batch None) so batch indices stay consecutive
            batch = None if not samples else (
                spec.collate(samples, _rng(spec.seed, 0xB7, spec.rank, n)) if spec.collate else samples)
            item = StreamItem(n, batch, events[:], epoch)
            events.clear()
            yield item
        if got == 0:
            raise ShardError(f"no readable sample in shards {shards[:3]}... (epoch {epoch}); "
                             f"see the skipped-sample warnings above and re-run train prepare")
        epoch += 1


class _Stream(torch.utils.data.IterableDataset):
    """torch IterableDataset over the rank's stream (a class at module level: workers unpickle it)."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[StreamItem]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        # rotation: the first batch after a resume comes from role start_batch % W, as it would have
        return role_stream(self.spec, (w + self.spec.start_batch) % self.spec.roles)


def _identity(x: Any) -> Any:
    return x


def _interleave(streams: list[Iterator[StreamItem]]) -> Iterator[StreamItem]:
    while True:
        for s in streams:
            yield next(s)


def open_stream(cfg: TrainConfig, rank: int = 0, world: int = 1, start_batch: int = 0,
                collate: Callable[[list[Sample], np.random.Generator], Any] | None = None,
                pin_memory: bool = False) -> Iterator[StreamItem]:
    """The rank's batches from ``start_batch`` on, forever. ``collate(samples, rng)`` builds each batch
    (in the loader workers); ``None`` yields the decoded ``Sample`` lists."""
    manifest = Manifest.load(cfg.data)
    paths = manifest.shard_paths(cfg.data)
    roles = max(1, cfg.num_workers)
    if len(paths) < world * roles:
        raise ShardError(f"{cfg.data}: {len(paths)} shard(s) for {world} process(es) x {roles} loader worker(s); "
                         "every worker needs at least one shard: lower num_workers or re-run prepare with smaller shards")
    spec = StreamSpec(paths, cfg.seed, rank, world, roles, cfg.batch_size, cfg.shuffle_buffer, start_batch, collate)
    if cfg.num_workers == 0:
        return _interleave([role_stream(spec, (w + start_batch) % roles) for w in range(roles)])
    loader = torch.utils.data.DataLoader(_Stream(spec), batch_size=None, num_workers=cfg.num_workers,
                                         collate_fn=_identity, pin_memory=pin_memory, prefetch_factor=2,
                                         persistent_workers=False)
    return iter(loader)


def validation_samples(cfg: TrainConfig) -> list[Sample]:
    """The fixed validation set: the first ``validation_samples`` readable samples of the first shard(s) in
    name order (the same on every run and every resume)."""
    paths = Manifest.load(cfg.data).shard_paths(cfg.data)
    events: list[SkipEvent] = []
    out: list[Sample] = []
    for raw in raw_samples(paths, events):
        try:
            out.append(decode_sample(raw))
        except Exception as exn:  # noqa: BLE001 - a bad sample is just not used for validation
            log.warning("validation set: skipped %s: %s", raw.get("__key__"), exn)
            continue
        if len(out) >= cfg.validation_samples:
            break
    return out


def describe(cfg: TrainConfig, world: int) -> str:
    m = Manifest.load(cfg.data)
    per_step = cfg.batch_size * cfg.grad_accum * world
    return (f"{m.samples} samples in {len(m.shards)} shards ({Path(cfg.data)}); {per_step} samples/step "
            f"({world} proc x {cfg.batch_size} x accum {cfg.grad_accum}); ~{cfg.steps * per_step / max(1, m.samples):.2f} "
            f"epochs in {cfg.steps} steps")


__all__ = [
    "SkipEvent",
    "StreamItem",
    "StreamSpec",
    "describe",
    "epoch_shards",
    "open_stream",
    "role_stream",
    "validation_samples",
]
