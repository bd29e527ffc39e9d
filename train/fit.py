"""``train fit``: the training loop (one process, or torchrun DDP on one or many machines).

What one optimizer step does, per process: ``grad_accum`` batches from the rank's deterministic stream
(train/data.py), each through ``TrainModel.loss(batch, generator)`` under bf16 autocast on CUDA (trainable
parameters stay fp32), gradients averaged over micro-batches and processes (DDP: nccl on GPU, gloo on CPU),
per-group gradient norms, global-norm clipping, AdamW with one learning rate per group (projection,
controlnet), optional EMA. The first non-finite loss or gradient stops every process with a message naming
the step and the group.

Exactness of a resume: the noise/timestep generator of micro-batch ``m`` of step ``s`` on rank ``k`` is
seeded from ``(seed, k, s, m)`` and the batch randomness from ``(seed, k, batch index)``, so nothing about
them needs saving; the model, optimizer, scheduler, EMA, global RNG states and the data position are in the
checkpoint. A resumed run therefore produces bit-identical parameters to an uninterrupted one (tested).

Rank 0 writes everything: ``<out>/checkpoints/step-*`` (train/checkpoint.py), ``<out>/logs/train.csv`` and
TensorBoard events in ``<out>/logs``, validation grids in ``<out>/samples/step-*.png``, skipped samples in
``<out>/logs/skipped.csv``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_states,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, load_config
from .data import SkipEvent, StreamItem, describe, open_stream, validation_samples
from .host import import_comfy
from .schedule import WarmupConstantCosine

log = logging.getLogger(__name__)

# Keys a resumed run may change without changing what it computes (bookkeeping and paths only).
RESUME_MAY_CHANGE = ("steps", "out", "data", "checkpoint", "controlnet_init", "checkpoint_every", "keep_last",
                     "log_every", "validate_every", "validation_samples", "validation_steps", "validation_cfg",
                     "face_encoder", "models_root", "extra")


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient: the message names the step and the parameter group."""


class ResumeError(ValueError):
    """A resume that would not continue the same run (different config, world size, workers)."""


@dataclass
class FitResult:
    step: int                                   # optimizer steps done (in all, including before a resume)
    losses: list[float] = field(default_factory=list)  # mean loss of each step this invocation ran
    stopped: str = ""                           # "" = reached cfg.steps; else why it stopped early
    checkpoint: Path | None = None


# ---------------------------------------------------------------- distributed setup

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Dist:
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) -> a process group; nccl on CUDA, gloo
    on CPU. Without torchrun: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def _all_reduce(t: torch.Tensor, dist: Dist, op: Any = None) -> torch.Tensor:
    if dist.on:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def _barrier(dist: Dist) -> None:
    if dist.on:
        torch.distributed.barrier()


# ---------------------------------------------------------------- pieces

class Collate:
    """``make_batch`` as a picklable callable for the loader workers."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self, samples, rng: np.random.Generator):
        from .batch import make_batch

        return make_batch(samples, self.cfg, rng)


def loss_generator(cfg: TrainConfig, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise and timesteps: a pure function of (seed, rank, step, micro)."""
    seed = int(np.random.SeedSequence([cfg.seed, 0x1055, rank, step, micro]).generate_state(1, dtype=np.uint64)[0])
    g = torch.Generator(device=device)
    g.manual_seed(seed & ((1 << 63) - 1))
    return g


def build_optimizer(cfg: TrainConfig, groups: dict[str, list[torch.nn.Parameter]]) -> torch.optim.AdamW:
    param_groups = []
    for name, params in groups.items():
        # each group's learning rate is the config key lr_<group> (lr_projection, lr_controlnet, lr_moa)
        lr = getattr(cfg, f"lr_{name}", None)
        if not isinstance(lr, (int, float)):
            raise ConfigError(f"model parameter group {name!r} has no learning rate: TrainConfig needs a key lr_{name}")
        params = [p for p in params if p.requires_grad]
        if params:
            param_groups.append({"params": params, "lr": float(lr), "name": name})
    if not param_groups:
        raise ConfigError("nothing to train: every parameter group is disabled or frozen")
    # foreach=False: the same per-parameter kernel on every device count, so 1 vs N processes agree.
    return torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, foreach=False)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupConstantCosine(cfg.lr_warmup, cfg.steps, cfg.lr_decay))


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Restore the step count and rates of a saved schedule, keeping this run's schedule shape: a resume may
    raise ``steps``, and the decay then ends at the new last step (the saved fields would end it at the old)."""
    scheduler.load_state_dict({**state, "lr_lambdas": [dict(vars(f)) for f in scheduler.lr_lambdas]})


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """A resumed run must compute what the original would have: every key but bookkeeping/paths equal."""
    try:
        old = TrainConfig.from_dict(saved)
    except ConfigError as e:
        raise ResumeError(f"{where}/config.json: {e}") from e
    diff = old.diff(cfg, ignore=RESUME_MAY_CHANGE)
    if diff:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in sorted(diff.items())))
        raise ResumeError(f"cannot resume from {where}: the config differs in {sorted(diff)} ({lines}). Resume "
                          "with the checkpoint's values (its config.json), or start a new run in another --out "
                          "folder (optionally initialised from this checkpoint's weights)")


def grad_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Per-group L2 norm of the (already averaged) gradients; fp32."""
    out = {}
    for name, params in groups.items():
        norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        out[name] = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return out


class EMA:
    """Exponential moving average of the trained tensors (fp32), updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.state = {k: v.detach().float().clone() for k, v in model.trainable_state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.trainable_state_dict().items():
            e = self.state[k]
            if v.is_floating_point():
                e.lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                e.copy_(v)


class RunLog:
    """CSV + TensorBoard scalars (rank 0 only)."""

    def __init__(self, out: Path, resume_step: int):
        self.dir = out / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "train.csv"
        self.skipped_path = self.dir / "skipped.csv"
        self._keys: list[str] | None = None
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self._keys = rows[0]
                # a resume drops rows logged after the checkpoint it continues from (they are re-run)
                keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= resume_step]
                with open(self.csv_path, "w", newline="") as f:
                    csv.writer(f).writerows(keep)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is in the [train] extra; CSV still works
            log.warning("tensorboard is not installed: logging to CSV only (pip install tensorboard)")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        if self._keys is None:
            self._keys = list(row)
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self._keys)
        elif set(row) - set(self._keys):
            # a new column (e.g. val/identity at the first validation): rewrite the file with it
            with open(self.csv_path, newline="") as f:
                old = list(csv.DictReader(f))
            self._keys += [k for k in row if k not in self._keys]
            with open(self.csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self._keys)
                w.writeheader()
                w.writerows(old)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self._keys])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def skipped(self, step: int, events: list[SkipEvent]) -> None:
        new = not self.skipped_path.is_file()
        with open(self.skipped_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "shard", "key", "reason"])
            for e in events:
                w.writerow([step, e.shard, e.key, e.reason])

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- validation

def validation_grid(model: Any, cfg: TrainConfig, samples: list, step: int, out: Path) -> tuple[Path, np.ndarray, dict]:
    """Rows: the real images, their control images, the model's samples (same seed every time)."""
    from PIL import Image

    from .batch import make_batch

    batch = make_batch(samples, cfg, np.random.default_rng([cfg.seed, 0x7A1]))
    batch = batch.__class__(**{**batch.__dict__, "drop_text": torch.zeros_like(batch.drop_text),
                               "drop_ids": torch.zeros_like(batch.drop_ids)})
    g = torch.Generator(device=model.device if hasattr(model, "device") else "cpu").manual_seed(cfg.seed)
    was = model.training
    model.eval()
    try:
        gen = model.sample(batch.to(model.device), steps=cfg.validation_steps, cfg_scale=cfg.validation_cfg,
                           generator=g)
    finally:
        model.train(was)
    res = gen.shape[-1]

    def rows(t: torch.Tensor) -> np.ndarray:
        t = torch.nn.functional.interpolate(t.float(), size=(res, res), mode="bilinear", align_corners=False)
        return (t.clamp(0, 1).permute(0, 2, 3, 1).reshape(-1, res, 3).cpu().numpy() * 255).round().astype(np.uint8)

    real = [np.asarray(Image.fromarray(s.image).resize((res, res), Image.BICUBIC)) for s in samples]
    top = np.concatenate(real, axis=0)
    grid = np.concatenate([top, rows(batch.control), rows(gen)], axis=1)  # columns: real | control | sample
    path = out / "samples" / f"step-{step:09d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    scores = identity_scores(cfg, samples, gen, batch) if cfg.face_encoder else {}
    return path, grid, scores


def identity_scores(cfg: TrainConfig, samples: list, gen: torch.Tensor, batch: Any,
                    encoder: Any | None = None) -> dict[str, float]:
    """evaluate/'s identity score (mean SingleSim over the chosen faces) of the generated images.

    For each sample, the references are the faces the encoder finds in the *real* image, each assigned to
    its slot by the slot's mask (evaluate's region matching); the generated image's faces are matched to
    the same masks and scored against them. A slot whose real face the encoder misses is left out; a
    generated face that is missing scores 0 (evaluate's rule). Returns ``{"val/identity": mean}``, or {}
    when no slot could be scored."""
    from PIL import Image

    from ..evaluate.identity import detect_faces, make_encoder
    from ..evaluate.matching import match_by_regions
    from ..evaluate.score import score_image

    enc = encoder or make_encoder(cfg.face_encoder, insightface_root=cfg.models_root or None)
    imgs = (gen.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    vals = []
    for i, s in enumerate(samples):
        img = imgs[i]
        slots = [j for j in range(batch.id_present.shape[1]) if bool(batch.id_present[i, j])]
        regions = [batch.masks[i, j].cpu().numpy() > 0.5 for j in slots]
        if not slots:
            continue
        real = np.asarray(Image.fromarray(s.image).resize((img.shape[1], img.shape[0]), Image.BICUBIC))
        real_faces = detect_faces(enc, real, want=len(slots))
        owner = match_by_regions([f.box for f in real_faces], regions)
        keep = [k for k, a in enumerate(owner) if a is not None]
        if not keep:
            continue
        refs = [real_faces[owner[k]].embedding for k in keep]
        sc = score_image(s.key, refs, list(range(len(keep))), detect_faces(enc, img, want=len(keep)),
                         regions=[regions[k] for k in keep], match="regions", size=img.shape[:2])
        vals.append(sc.identity)
    return {"val/identity": float(np.mean(vals))} if vals else {}


# ---------------------------------------------------------------- one optimizer step

def train_step(ddp: Any, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, ema: EMA | None,
               groups: dict[str, list[torch.nn.Parameter]], pairs: list[tuple[Any, torch.Generator]],
               cfg: TrainConfig, dist: Dist, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over the micro-batches ``pairs`` = [(batch, generator)]: the gradient is the mean of
    the micro-batch losses' gradients (and, under DDP, of every process's). Returns (mean loss, grad norms
    per group before clipping). Raises :class:`NonFiniteError` naming the step and group."""
    optimizer.zero_grad(set_to_none=True)
    losses = []
    finite = torch.ones((), device=dist.device)
    for m, (batch, gen) in enumerate(pairs):
        # gradients are all-reduced once per step, on the last micro-batch
        ctx = ddp.no_sync() if (dist.on and m < len(pairs) - 1) else nullcontext()
        with ctx:
            loss = ddp(batch, gen)
            finite.mul_(torch.isfinite(loss.detach()).to(finite.dtype))  # on the device: no sync per micro-batch
            # backward even on a NaN so every process reaches the same all-reduce, then all stop together
            (loss / len(pairs)).backward()
        losses.append(loss.detach().float())
    _all_reduce(finite, dist, torch.distributed.ReduceOp.MIN if dist.on else None)
    norms = grad_norms(groups)
    if finite.item() == 0:
        broken = [name for name, ps in groups.items() if any(not torch.isfinite(p.detach()).all() for p in ps)]
        where = (f"parameter group {broken[0]!r} holds non-finite weights (the previous update diverged)" if broken
                 else f"every parameter group ({', '.join(groups)}) is finite, so the batch or the forward pass made "
                 f"it (batch keys {[k for b, _ in pairs for k in b.keys][:8]})")
        raise NonFiniteError(f"step {step + 1}: the loss is not finite (this process: {[float(x) for x in losses]}); "
                             f"{where}. Lower the learning rates or check the data, and resume from the last "
                             "checkpoint (--resume)")
    bad = [name for name, n in norms.items() if not torch.isfinite(n)]
    if bad:
        raise NonFiniteError(f"step {step + 1}: the gradient of parameter group {bad[0]!r} is not finite (norms "
                             f"{ {k: float(v) for k, v in norms.items()} }); lower lr_{bad[0]} or check the data, and "
                             "resume from the last checkpoint (--resume)")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for ps in groups.values() for p in ps], cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update(model)
    mean = torch.stack(losses).mean() if losses else torch.zeros((), device=dist.device)
    return mean, norms


# ---------------------------------------------------------------- the loop

def setup_comfy(cfg: TrainConfig, device: torch.device) -> None:
    """ComfyUI's model code importable, CPU mode without CUDA, tiny test checkpoints registered."""
    import_comfy(checkpoint=cfg.checkpoint or None, cpu=device.type != "cuda")


def _resolve_resume(cfg: TrainConfig, resume: bool | str | None) -> Path | None:
    if not resume:
        return None
    if resume is True or resume == "latest":
        p = latest_checkpoint(Path(cfg.out) / "checkpoints")
        if p is None:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", Path(cfg.out) / "checkpoints")
        return p
    return Path(resume)


def fit(cfg: TrainConfig, resume: bool | str | None = None, max_steps: int | None = None,
        device: str | None = None, model: Any | None = None, progress: bool = True) -> FitResult:
    """Train until ``cfg.steps`` (or ``max_steps`` more steps this invocation, or SIGTERM), checkpointing.
    ``model``: an already-built TrainModel (tests); else built from ``cfg``."""
    cfg.validate()
    for key in ("data", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"config key {key!r} is empty: set it in the config file or with --set {key}=...")
    dist = init_distributed(device)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (1 << 32))

    from .shards import Manifest

    manifest = Manifest.load(cfg.data)
    if manifest.has_latents and int(manifest.resolution) != cfg.resolution:
        raise ConfigError(f"config key 'resolution' = {cfg.resolution}, but the shards in {cfg.data} cache VAE latents "
                          f"made at {manifest.resolution} px: set resolution = {manifest.resolution}, or re-run prepare")
    # a resume is checked before the (slow) model build: a wrong config fails in a second
    ck_path = _resolve_resume(cfg, resume)
    ck: Checkpoint | None = None
    if ck_path is None and not resume and latest_checkpoint(out / "checkpoints") is not None:
        # starting over would mix two runs in one folder (and keep_last would delete the new checkpoints)
        raise ResumeError(f"{out} already holds a run (latest checkpoint {latest_checkpoint(out / 'checkpoints')}); "
                          "pass --resume to continue it, or set another out folder")
    if ck_path is not None:
        ck = load_checkpoint(ck_path)
        check_resume_config(ck.config, cfg, ck.path)
        pos = ck.data_position
        for k, now in (("world", dist.world), ("roles", max(1, cfg.num_workers))):
            if int(pos.get(k, now)) != now:
                raise ResumeError(f"cannot resume from {ck.path} exactly: it was written with {k} = {pos[k]}, this "
                                  f"run has {now}; use the same number of processes and loader workers")
    if model is None:
        if not cfg.checkpoint:
            raise ConfigError("config key 'checkpoint' is empty: set the SD1.5 checkpoint (.safetensors) to train on")
        setup_comfy(cfg, dist.device)
        from .model import TrainModel

        model = TrainModel.build(cfg, manifest, dist.device)
    groups = model.param_groups()
    optimizer = build_optimizer(cfg, groups)
    scheduler = build_scheduler(cfg, optimizer)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    step, next_batch = 0, 0
    if ck is not None:
        pos = ck.data_position
        model.load_trainable_state_dict(ck.model_state)
        optimizer.load_state_dict(ck.optimizer_state)
        if ck.scheduler_state is not None:
            load_scheduler_state(scheduler, ck.scheduler_state)
        if ema is not None:
            if ck.ema_state is None:
                raise ResumeError(f"{ck.path} has no EMA state but ema_decay = {cfg.ema_decay}")
            ema.state = {k: v.to(dist.device) for k, v in ck.ema_state.items()}
        restore_rng_states(ck.rng_states)
        step = ck.step
        next_batch = int(pos["next_batch"][dist.rank] if isinstance(pos.get("next_batch"), list) else pos["next_batch"])
        if dist.main:
            log.info("resumed from %s: step %d, batch %d", ck.path, step, next_batch)

    ddp = model
    if dist.on:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            broadcast_buffers=False)
    model.train()

    runlog = RunLog(out, step) if dist.main else None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        log.info(describe(cfg, dist.world))
    val_set = validation_samples(cfg) if (cfg.validate_every and dist.main) else []

    stream = open_stream(cfg, dist.rank, dist.world, next_batch, collate=Collate(cfg),
                         pin_memory=dist.device.type == "cuda")

    stop = {"why": ""}
    old_handlers: dict[int, Any] = {}
    if _in_main_thread():
        def on_term(signum, frame):  # finish the step, checkpoint, exit cleanly (cluster preemption, Ctrl-C)
            if stop["why"] and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
            stop["why"] = f"signal {signal.Signals(signum).name}"
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again to abort)")
        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, on_term)

    bar = None
    if dist.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="fit", unit="step", dynamic_ncols=True)

    result = FitResult(step=step)
    limit = cfg.steps if max_steps is None else min(cfg.steps, step + int(max_steps))
    t_last, samples_since = time.perf_counter(), 0
    last_saved = step if ck_path is not None else -1
    try:
        while step < limit:
            pairs, events = [], []
            while len(pairs) < cfg.grad_accum:
                item: StreamItem = next(stream)
                if item.index != next_batch:
                    raise RuntimeError(f"data stream out of order: got batch {item.index}, expected {next_batch} "
                                       "(a bug: please report)")
                next_batch += 1
                events += item.skipped
                if item.batch is None:
                    continue  # every sample of this batch was unreadable (reported)
                pairs.append((item.batch.to(dist.device, non_blocking=True),
                              loss_generator(cfg, dist.rank, step, len(pairs), dist.device)))
            if events:
                for e in events:
                    log.warning("step %d: %s", step + 1, e.line())
                if runlog is not None:
                    runlog.skipped(step + 1, events)
            mean_loss, norms = train_step(ddp, model, optimizer, scheduler, ema, groups, pairs, cfg, dist, step)
            samples_since += sum(b.size for b, _ in pairs)
            step += 1
            result.losses.append(float(mean_loss))
            result.step = step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(mean_loss):.4f}")

            if step % cfg.log_every == 0 or step == limit:
                avg = _all_reduce(mean_loss.clone(), dist) / dist.world
                now = time.perf_counter()
                rate = torch.tensor(float(samples_since) / max(now - t_last, 1e-9), device=dist.device)  # nccl: on GPU
                rate = _all_reduce(rate, dist)  # samples/s of the whole job
                t_last, samples_since = now, 0
                if runlog is not None:
                    vals = {"loss": float(avg), "samples_per_s": float(rate),
                            "epoch": next_batch * cfg.batch_size * dist.world / max(1, manifest.samples)}
                    for g in optimizer.param_groups:
                        vals[f"lr/{g['name']}"] = float(g["lr"])
                    for name, n in norms.items():
                        vals[f"grad_norm/{name}"] = float(n)
                    runlog.scalars(step, vals)

            if cfg.validate_every and step % cfg.validate_every == 0 and dist.main and val_set:
                path, grid, scores = validation_grid(model, cfg, val_set, step, out)
                runlog.image("val/samples", grid, step)
                if scores:
                    runlog.scalars(step, scores)
                log.info("step %d: validation grid %s %s", step, path, scores)
            if cfg.validate_every and step % cfg.validate_every == 0:
                _barrier(dist)

            # a stop request on any process stops all of them after the same step
            flag = torch.tensor(1.0 if stop["why"] else 0.0, device=dist.device)
            stopping = bool(_all_reduce(flag, dist).item() > 0)
            if step % cfg.checkpoint_every == 0 or step == limit or stopping:
                result.checkpoint = _save(cfg, out, step, model, optimizer, scheduler, ema, next_batch, dist)
                last_saved = step
            if stopping:
                result.stopped = stop["why"] or "signal on another process"
                break
        if step >= limit and step < cfg.steps:
            result.stopped = result.stopped or f"max_steps ({max_steps}) reached"
        if last_saved != step:
            result.checkpoint = _save(cfg, out, step, model, optimizer, scheduler, ema, next_batch, dist)
    finally:
        if bar is not None:
            bar.close()
        if runlog is not None:
            runlog.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        del stream
    return result


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _save(cfg: TrainConfig, out: Path, step: int, model: Any, optimizer, scheduler, ema: EMA | None,
          next_batch: int, dist: Dist) -> Path | None:
    """Rank 0 writes; the others wait so nobody races ahead of a checkpoint that may be resumed from."""
    # Ranks consume the same number of batches unless one met a batch with no readable sample (it then
    # takes one more): the position is one number when all agree, else one per rank.
    per_rank = [next_batch]
    if dist.on:
        mine = torch.tensor([next_batch], dtype=torch.long, device=dist.device)
        everyone = [torch.zeros_like(mine) for _ in range(dist.world)]
        torch.distributed.all_gather(everyone, mine)
        per_rank = [int(t.item()) for t in everyone]
    same = len(set(per_rank)) == 1
    pos = {"next_batch": per_rank[0] if same else per_rank, "world": dist.world, "roles": max(1, cfg.num_workers),
           "samples_per_rank": per_rank[0] * cfg.batch_size if same else [n * cfg.batch_size for n in per_rank],
           "batch_size": cfg.batch_size}
    rng = capture_rng_states()
    # not a state: each micro-batch's noise/timestep generator is re-seeded from these numbers
    rng["loss_generator"] = {"seed_sequence": [cfg.seed, 0x1055, "rank", "step", "micro_batch"]}
    path = None
    err: BaseException | None = None
    if dist.main:
        try:
            path = save_checkpoint(out / "checkpoints", step, model.trainable_state_dict(), optimizer, scheduler,
                                   ema.state if ema is not None else None, rng, pos,
                                   cfg.to_dict(), keep_last=cfg.keep_last)
        except CheckpointError as e:
            err = e
    ok = torch.tensor(0.0 if err else 1.0, device=dist.device)
    _all_reduce(ok, dist, torch.distributed.ReduceOp.MIN if dist.on else None)
    if err is not None:
        raise err
    if ok.item() == 0:
        raise CheckpointError(f"step {step}: rank 0 could not save the checkpoint (see its log); stopping")
    return path


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML or YAML training config (keys: see train/config.py / README)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lr_controlnet=2e-5 (repeatable)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in <out>/checkpoints")
    g.add_argument("--resume-from", metavar="DIR", help="continue from this checkpoint folder (step-NNNNNNNNN)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop (with a checkpoint) after this many steps of this invocation")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    from .model import ModelSetupError
    from .shards import ShardError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        resume: bool | str | None = args.resume_from or bool(args.resume)
        res = fit(cfg, resume=resume, max_steps=args.max_steps, device=args.device, progress=not args.no_progress)
    except (ConfigError, ResumeError, CheckpointError, NonFiniteError, ShardError, ModelSetupError) as e:
        # what the user must fix: one clear line, no traceback
        print(f"train fit: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    last = f"; last checkpoint {res.checkpoint}" if res.checkpoint else ""
    print(f"train fit: step {res.step}/{cfg.steps}" + (f", stopped: {res.stopped}" if res.stopped else ", done") + last)
    return 0

