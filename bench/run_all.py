"""Run every benchmark script in bench/ and gather their results into bench/RESULTS.md.

    python bench/run_all.py                  # run all scripts on this machine's default device, then collect
    python bench/run_all.py --quick          # pass --quick to the scripts that have it (a smoke run)
    python bench/run_all.py --device cuda    # pass --device to the scripts that have it
    python bench/run_all.py --only attention,faces
    python bench/run_all.py --collect-only   # no runs: rebuild RESULTS.md from bench/results/*.json

Every ``bench/*.py`` except this file and ``common.py`` is a benchmark; each writes
``bench/results/<area>[-cpu|-cuda].json``. RESULTS.md has one section per device kind (CPU, CUDA) and
one table per area inside it (attention, faces, step, then train, MoA and anything new), each with the
machine, versions and date its numbers came from. A run on one device never erases the other
device's section: results files are kept per device (a script that writes ``<area>.json`` without a
device suffix gets a ``<area>-<kind>.json`` copy after it runs).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cell, cpu_name, markdown_table  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
OUTPUT = BENCH / "RESULTS.md"
NOT_BENCHMARKS = {"run_all.py", "common.py", "__init__.py"}
AREA_ORDER = ("attention", "faces", "step", "train", "moa")
KINDS = ("cpu", "cuda")


def scripts(only: set[str] | None = None) -> list[Path]:
    found = [p for p in sorted(BENCH.glob("*.py")) if p.name not in NOT_BENCHMARKS]
    if only:
        missing = only - {p.stem for p in found}
        if missing:
            raise SystemExit(f"--only: no bench/{', bench/'.join(sorted(missing))}.py; present: "
                             f"{', '.join(p.stem for p in found)}")
        found = [p for p in found if p.stem in only]
    return found


def _accepts(script: Path, flag: str) -> bool:
    # Looking at the source is cheaper than importing torch once per --help, and every script here
    # declares its flags with argparse literally.
    return f'"{flag}"' in script.read_text(encoding="utf-8")


def command(script: Path, quick: bool, device: str | None) -> list[str]:
    cmd = [sys.executable, str(script)]
    if quick and _accepts(script, "--quick"):
        cmd.append("--quick")
    if device and _accepts(script, "--device"):
        cmd += ["--device", device]
    return cmd


def run_scripts(paths: list[Path], quick: bool, device: str | None, timeout: float) -> list[dict]:
    """Run each script (failures are recorded, not fatal); return one record per script."""
    runs = []
    for p in paths:
        cmd = command(p, quick, device)
        print(f"\n=== {p.name}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=BENCH.parent, timeout=timeout, text=True, capture_output=True)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            status, tail = f"timed out after {timeout:.0f} s", ""
        took = time.time() - start
        print(tail if status != "ok" else "\n".join((tail or "").splitlines()[-5:]), flush=True)
        print(f"--- {p.name}: {status} in {took:.0f} s", flush=True)
        runs.append({"script": p.name, "args": " ".join(cmd[2:]), "status": status, "seconds": round(took, 1),
                     "started": start})
    return runs


def kind_of(path: Path, data: dict) -> str:
    """cpu or cuda: from the file name suffix, else from the machine description inside."""
    for k in KINDS:
        if path.stem.endswith(f"-{k}"):
            return k
    m = data.get("machine", {}) if isinstance(data, dict) else {}
    dev = str(m.get("device", ""))
    if dev.startswith("cuda") or "gpu" in m:
        return "cuda"
    return "cpu"


def area_of(path: Path) -> str:
    stem = path.stem
    for k in KINDS:
        if stem.endswith(f"-{k}"):
            return stem[: -len(k) - 1]
    return stem


def keep_per_device(since: float) -> None:
    """Copy results written since ``since`` without a device suffix to <area>-<kind>.json."""
    for p in RESULTS.glob("*.json"):
        if p.stat().st_mtime >= since and area_of(p) == p.stem:
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            shutil.copy2(p, RESULTS / f"{p.stem}-{kind_of(p, data)}.json")


def collect() -> dict[str, dict[str, tuple[Path, dict]]]:
    """{kind: {area: (file, data)}}; the newest file wins when two describe the same area and device."""
    out: dict[str, dict[str, tuple[Path, dict]]] = {k: {} for k in KINDS}
    for p in sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []:
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {p.name}: {exc}", file=sys.stderr)
            continue
        k, a = kind_of(p, data), area_of(p)
        old = out[k].get(a)
        if old is None or p.stat().st_mtime > old[0].stat().st_mtime:
            out[k][a] = (p, data)
    return out


def tables(data: dict) -> list[tuple[str, str]]:
    """(title, markdown) for each table in a results file: the common {columns, rows} format, or any
    list of records (one table per key)."""
    if not isinstance(data, dict):
        return []
    if "columns" in data and "rows" in data:
        return [("", markdown_table(list(data["columns"]), data["rows"]))]
    out = []
    for key, val in data.items():
        if key == "machine" or not isinstance(val, list) or not val or not all(isinstance(r, dict) for r in val):
            continue
        # records with different fields (a summary row, then measurements) become separate tables
        groups: list[list[dict]] = []
        for r in val:
            if groups and list(groups[-1][0]) == list(r):
                groups[-1].append(r)
            else:
                groups.append([r])
        for g in groups:
            cols = list(g[0])
            out.append((key, markdown_table(cols, [[r.get(c, "") for c in cols] for r in g])))
    return out


def area_key(a: str) -> tuple:
    return (AREA_ORDER.index(a) if a in AREA_ORDER else len(AREA_ORDER), a)


def this_machine() -> dict[str, str]:
    import importlib.metadata as md

    cpu = cpu_name()
    info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
            "cpu": f"{cpu} ({os.cpu_count()} logical cores)", "os": platform.platform(), "python": platform.python_version()}
    for dist in ("torch", "numpy", "onnxruntime", "onnxruntime-gpu", "dlib-bin", "insightface"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return info


def render(results: dict, runs: list[dict], me: dict, run_kind: str | None) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python bench/run_all.py` from `bench/results/*.json`. Each area's numbers name the",
             "machine and date they were measured on; CPU and CUDA sections are kept separately.", "",
             "## Last run", ""]
    lines += [f"- {k}: {v}" for k, v in me.items()]
    if runs:
        lines += ["", markdown_table(["script", "args", "device", "status", "seconds"],
                               [[r["script"], r["args"] or "-", run_kind or "default", r["status"], r["seconds"]]
                                for r in runs])]
    else:
        lines += ["", "(collect only: no scripts were run)"]
    for kind in KINDS:
        lines += ["", f"## {kind.upper()}", ""]
        areas = results.get(kind, {})
        if not areas:
            hint = "a machine with an NVIDIA GPU: `python bench/run_all.py --device cuda`" if kind == "cuda" else \
                "`python bench/run_all.py --device cpu`"
            lines += [f"No {kind.upper()} results yet; run on {hint}."]
            continue
        for area in sorted(areas, key=area_key):
            path, data = areas[area]
            lines += [f"### {area}", "", f"From `bench/results/{path.name}`."]
            m = data.get("machine", {}) if isinstance(data, dict) else {}
            if m:
                lines += [""] + [f"- {k}: {cell(v) if not isinstance(v, list) else ', '.join(map(str, v))}"
                                 for k, v in m.items()]
            for title, table in tables(data):
                lines += ["", f"**{title}**", ""] if title else [""]
                lines.append(table)
            if isinstance(data, dict) and data.get("notes"):
                lines += ["", str(data["notes"])]
            lines.append("")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def print_tables(results: dict) -> None:
    for kind in KINDS:
        for area in sorted(results.get(kind, {}), key=area_key):
            path, data = results[kind][area]
            print(f"\n## {area} ({kind}) - {path.name}")
            for title, table in tables(data):
                if title:
                    print(f"[{title}]")
                print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass --quick to the scripts that accept it")
    ap.add_argument("--device", help="pass --device (cpu, cuda) to the scripts that accept it")
    ap.add_argument("--only", help="comma-separated script names (attention,faces,...)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per script (default 3600)")
    ap.add_argument("--collect-only", action="store_true", help="do not run anything; rebuild RESULTS.md")
    ap.add_argument("--output", default=str(OUTPUT), help="where to write the report (default bench/RESULTS.md)")
    args = ap.parse_args(argv)
    runs: list[dict] = []
    if not args.collect_only:
        only = {s.strip() for s in args.only.split(",") if s.strip()} if args.only else None
        start = time.time() - 1
        runs = run_scripts(scripts(only), args.quick, args.device, args.timeout)
        keep_per_device(start)
    results = collect()
    print_tables(results)
    kind = None
    if args.device:
        kind = "cuda" if args.device.startswith("cuda") else "cpu"
    Path(args.output).write_text(render(results, runs, this_machine(), kind), encoding="utf-8")
    print(f"\nwritten: {args.output}")
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        print("failed: " + ", ".join(f"{r['script']} ({r['status']})" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
