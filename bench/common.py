"""Shared benchmark plumbing: machine description, timing, peak memory, results files.

Timing uses torch.utils.benchmark (it synchronises CUDA and picks repeat counts). Variants of one
configuration are timed in interleaved rounds and the best round kept, so a neighbour process on a
shared machine slows all variants alike instead of skewing one ratio.

Peak memory: on CUDA, torch's allocator statistics. On CPU, the process's resident high-water mark
(VmHWM), reset before each measurement through /proc/self/clear_refs, after glibc's malloc_trim has
handed freed memory back to the OS (so earlier calls' freed tensors do not hide this call's peak).
The allocator itself is left as users run it, so timings are not distorted.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.benchmark import Timer

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, str]:
    cpu = cpu_name()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": f"{cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 3, min_run_time: float = 0.3) -> dict[str, float]:
    """Seconds per call (median within a round, best round) for each named callable."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median
            best[name] = min(best[name], t)
    return best


def interleaved_steps(steps: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Seconds per step: each round runs ``per_round`` steps of every variant in turn; best round kept.
    (Plain wall clock: a training step is long enough, and it must run with the garbage collector on, as
    in `train fit`.)"""
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / per_round)
    return best


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], object], device: str) -> float:
    """Peak bytes allocated by one call above what was allocated before it (outputs included)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return float(peak)
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm("VmRSS")
    out = fn()
    peak = _vm("VmHWM") - before
    del out
    return float(max(peak, 0))


def write_results(name: str, device: str, info: dict[str, str], header: list[str], rows: list[list], notes: str = "") -> Path:
    """Write bench/results/<name>-<device kind>.md and .json; return the markdown path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    md = [f"# {name} ({kind})", ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += ["", markdown_table(header, rows)]
    if notes:
        md += ["", notes]
    path = RESULTS_DIR / f"{name}-{kind}.md"
    path.write_text("\n".join(md) + "\n")
    (RESULTS_DIR / f"{name}-{kind}.json").write_text(json.dumps(
        {"machine": info, "columns": header, "rows": rows}, indent=1) + "\n")
    return path


def cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, (list, tuple)):
        return "x".join(cell(v) for v in x)
    return str(x).replace("|", "/")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats to 3 significant digits, lists as AxB, '|' kept out of cells."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def grid_face_masks(n: int, size: int) -> torch.Tensor:
    """N face boxes (half a cell each) on a square grid of cells over a size x size canvas, as a group
    photo's would be: about a quarter of the picture is face, whatever N is."""
    m = torch.zeros(n, size, size)
    cols = max(1, int(n ** 0.5 + 0.999))
    cell = size // cols
    for i in range(n):
        r, c = divmod(i, cols)
        m[i, r * cell + cell // 4: r * cell + 3 * cell // 4, c * cell + cell // 4: c * cell + 3 * cell // 4] = 1
    return m
