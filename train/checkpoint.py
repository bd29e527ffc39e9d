"""Training checkpoints: atomic, last K kept, nothing pickled.

A checkpoint is a folder ``<dir>/step-000001234/``::

    trainable.safetensors   the trained tensors (TrainModel.trainable_state_dict)
    optimizer.safetensors   optimizer state tensors, flattened: "state.<param index>.<name>"
    ema.safetensors         EMA tensors (only when EMA is on)
    rng.safetensors         torch CPU (and CUDA) generator states (uint8 tensors)
    state.json              step, the optimizer's non-tensor state and param groups, the scheduler, python
                            and numpy RNG states, the data position
    config.json             the run's TrainConfig
    checkpoint.json         the manifest: format, step, every file with its size -- written LAST

Writing goes to a hidden temp folder in ``<dir>``; the manifest is written last, then the folder is
renamed to its final name. A folder without a manifest, or a hidden temp folder, is never loaded, so a run
killed mid-save leaves the previous checkpoint as the latest loadable one. A failed write (full disk)
removes the temp folder and raises :class:`CheckpointError` saying the previous checkpoint is intact.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "instantfamily-train-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says which folder and what to do."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns (everything :func:`save_checkpoint` was given)."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]           # torch optimizer state_dict layout, ready for load_state_dict
    scheduler_state: dict[str, Any] | None
    ema_state: dict[str, torch.Tensor] | None
    rng_states: dict[str, Any]
    data_position: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step-{int(step):09d}"


# ---------------------------------------------------------------- writing

def _write_bytes(path: Path, data: bytes) -> None:
    """Write + fsync one file (the single place bytes hit the disk: a full disk surfaces here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer ``state_dict()`` -> (tensors, JSON-able rest); :func:`unflatten_optimizer_state`
    inverts it exactly (dtypes, shapes and scalar tensors like Adam's ``step`` kept)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state_dict["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{int(idx)}.{name}"] = v
            else:
                scalars.setdefault(str(int(idx)), {})[name] = v
    groups = []
    for g in state_dict["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"scalars": scalars, "param_groups": groups,
                     "tuples": sorted({k for g in state_dict["param_groups"] for k, v in g.items() if isinstance(v, tuple)})}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    tuples = set(rest.get("tuples", []))
    groups = [{k: (tuple(v) if k in tuples else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _jsonable(obj: Any, what: str) -> Any:
    try:
        json.dumps(obj)
    except TypeError as e:
        raise CheckpointError(f"{what} is not JSON-serialisable ({e}); checkpoints never pickle") from e
    return obj


def _rng_split(rng_states: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in rng_states.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in rng_states.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def checkpoints(dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``dir`` (final name + manifest), oldest first."""
    d = Path(dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any], scheduler: Any | None,
                    ema_state: dict[str, torch.Tensor] | None, rng_states: dict[str, Any],
                    data_position: dict[str, Any], config: dict[str, Any], keep_last: int = 3,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically into ``dir``; keep the newest ``keep_last``. Returns its folder."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / step_dir_name(step)
    opt_sd = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
    opt_tensors, opt_rest = flatten_optimizer_state(opt_sd)
    sched_sd = scheduler.state_dict() if scheduler is not None and hasattr(scheduler, "state_dict") else scheduler
    rng_tensors, rng_rest = _rng_split(rng_states)
    state = {
        "step": int(step),
        "optimizer": _jsonable(opt_rest, "optimizer state (non-tensor part)"),
        "scheduler": _jsonable(sched_sd, "scheduler state"),
        "rng": _jsonable(rng_rest, "RNG states (non-tensor part)"),
        "data_position": _jsonable(data_position, "data position"),
        "extra": _jsonable(extra or {}, "extra"),
    }
    _jsonable(config, "config")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=d))
    try:
        files = {
            "trainable.safetensors": st_save(_contiguous(model_state)),
            "optimizer.safetensors": st_save(_contiguous(opt_tensors)),
            "rng.safetensors": st_save(_contiguous(rng_tensors)),
        }
        if ema_state is not None:
            files["ema.safetensors"] = st_save(_contiguous(ema_state))
        for name, data in files.items():
            _write_bytes(tmp / name, data)
        _write_json(tmp / "state.json", state)
        _write_json(tmp / "config.json", config)
        _before_manifest(tmp)
        listing = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                                     "files": listing})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(d)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = checkpoints(d)
        where = f"the previous checkpoint {prev[-1][1]} is intact" if prev else "no earlier checkpoint exists"
        hint = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder is writable"
        raise CheckpointError(f"saving checkpoint step {step} to {d} failed: {e.strerror or e}; {where}; "
                              f"{hint} and resume with --resume") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(d, keep_last)
    return final


def _before_manifest(tmp: Path) -> None:
    """Hook between the data files and the manifest (tests kill the process here)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temp folders of killed saves."""
    d = Path(dir)
    done = checkpoints(d)
    for _, p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in d.iterdir():
        if p.name.startswith(".tmp-step-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- reading

def latest_checkpoint(dir: str | os.PathLike) -> Path | None:
    found = checkpoints(dir)
    return found[-1][1] if found else None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return st_load(path.read_bytes())


def load_checkpoint(dir: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Load a checkpoint. ``dir`` is either a checkpoint folder (``step-*``) or the folder holding them
    (then ``step``, or the latest). Safetensors and JSON only; never unpickles."""
    d = Path(dir)
    if (d / MANIFEST).is_file():
        path = d
    else:
        found = checkpoints(d)
        if not found:
            raise CheckpointError(f"{d}: no complete checkpoint (a step-NNNNNNNNN folder with {MANIFEST}); "
                                  "start without --resume, or point --resume-from at a checkpoint folder")
        if step is None:
            path = found[-1][1]
        else:
            by_step = dict(found)
            if int(step) not in by_step:
                raise CheckpointError(f"{d}: no checkpoint for step {step}; have steps {[s for s, _ in found]}")
            path = by_step[int(step)]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an InstantFamily training checkpoint (format {manifest.get('format')!r})")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest['format_version']} is newer than this pack "
                              f"reads ({FORMAT_VERSION}); update instantfamily_nodes")
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if name != MANIFEST and (not f.is_file() or f.stat().st_size != size):
            raise CheckpointError(f"{path}: {name} is missing or has the wrong size (expected {size} bytes); "
                                  "the checkpoint is damaged: resume from an earlier one with --resume-from")
    try:
        state = json.loads((path / "state.json").read_text())
        config = json.loads((path / "config.json").read_text())
        model_state = _read_tensors(path / "trainable.safetensors")
        opt = unflatten_optimizer_state(_read_tensors(path / "optimizer.safetensors"), state["optimizer"])
        rng = {**_read_tensors(path / "rng.safetensors"), **state.get("rng", {})}
        ema = _read_tensors(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); resume from an "
                              "earlier one with --resume-from") from e
    return Checkpoint(path=path, step=int(state["step"]), model_state=model_state, optimizer_state=opt,
                      scheduler_state=state.get("scheduler"), ema_state=ema, rng_states=rng,
                      data_position=state.get("data_position", {}), config=config, extra=state.get("extra", {}))


# ---------------------------------------------------------------- RNG states

def capture_rng_states() -> dict[str, Any]:
    """Python, numpy (legacy global) and torch CPU/CUDA generator states, as JSON values and tensors."""
    import random

    import numpy as np

    py = random.getstate()
    npst = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    if "python" in states:
        v, st, g = states["python"]
        random.setstate((v, tuple(st), g))
    if "numpy" in states:
        name, key, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cpu" in states:
        torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("torch_cuda_")),
                                      key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
