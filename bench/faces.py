"""Face encoding speed: faces per second for detection + embedding, and the cost of the local feature
output next to the embedding alone.

    python -m instantfamily_nodes.bench.faces            (or: python bench/faces.py)

Prints a table and writes bench/results/faces.md and faces.json naming the machine. The dlib rows use
real photos; the insightface rows use an ArcFace-sized network built on the spot (no antelopev2 pack
can be downloaded here), which is what the local-output cost depends on: the same forward pass, one
extra output tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "instantfamily_nodes.bench"

from ..models.faces import onnx_local  # noqa: E402
from .common import cpu_name  # noqa: E402
from ..models.faces.encode import encode_faces  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import onnxruntime as ort

    return {
        "host": platform.node(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def timed(fn, repeats: int, desc: str) -> float:
    """Median seconds per call after one warm-up call."""
    return interleaved({desc: fn}, repeats, desc)[desc]


def interleaved(fns: dict, repeats: int, desc: str) -> dict[str, float]:
    """Median seconds per call of each function, run in alternating rounds so that load from other
    processes on a shared machine hits all variants alike (comparisons stay fair)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in tqdm(range(repeats), desc=desc, leave=False, disable=None):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def photos() -> dict[str, np.ndarray]:
    import importlib.util

    import matplotlib
    from PIL import Image

    insight = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0])
    skimage = Path(list(importlib.util.find_spec("skimage").submodule_search_locations)[0])
    paths = {
        "t1.jpg (group)": insight / "data" / "images" / "t1.jpg",
        "astronaut.png": skimage / "data" / "astronaut.png",
        "grace_hopper.jpg": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    }
    return {k: np.asarray(Image.open(p).convert("RGB")) for k, p in paths.items()}


def bench_dlib(repeats: int) -> list[dict]:
    from ..models.faces.dlib_backend import DlibEncoder

    enc = DlibEncoder()
    rows = []
    for name, img in photos().items():
        n = len(encode_faces(enc, img))
        s = timed(lambda: encode_faces(enc, img), repeats, f"dlib {name}")
        rows.append({"backend": "dlib (HOG + 68 landmarks + ResNet-128)", "input": f"{name} {img.shape[1]}x{img.shape[0]}",
                     "faces": n, "ms_per_image": 1000 * s, "faces_per_s": n / s})
    return rows


def bench_local_cost(repeats: int, batches: tuple[int, ...]) -> list[dict]:
    import onnxruntime as ort

    from ..models.faces import synthetic

    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "arcface_sized.onnx"
        # width 64 -> 512 channels on a 7x7 map and a 512-d embedding, like glintr100 / w600k_r50's heads
        synthetic.export_arcface_like(path, width=64, emb_dim=512)
        cpu = ["CPUExecutionProvider"]
        t = time.perf_counter()
        model = onnx_local.load_local_feature_model(path, cpu, cache_dir=Path(d) / "cache")
        load_edit = time.perf_counter() - t
        t = time.perf_counter()
        onnx_local.load_local_feature_model(path, cpu, cache_dir=Path(d) / "cache")
        load_cached = time.perf_counter() - t
        original = ort.InferenceSession(str(path), providers=cpu)
        in_name = original.get_inputs()[0].name
        rng = np.random.default_rng(0)
        for b in batches:
            crops = rng.integers(0, 256, (b, 112, 112, 3), dtype=np.uint8)
            blob = model.blob(crops)
            t = interleaved({"orig": lambda: original.run(None, {in_name: blob}),
                             "emb": lambda: model.run(crops, with_local=False),
                             "both": lambda: model.run(crops, with_local=True)}, repeats, f"batch {b}")
            t_orig, t_emb, t_both = t["orig"], t["emb"], t["both"]
            rows.append({"batch": b, "original_ms": 1000 * t_orig, "edited_embedding_ms": 1000 * t_emb,
                         "edited_embedding_local_ms": 1000 * t_both, "local_overhead_pct": 100 * (t_both / t_orig - 1),
                         "faces_per_s_embedding_local": b / t_both})
        meta = {"local_shape": list(model.local_shape), "embedding_dim": model.embedding_dim,
                "params_mb": path.stat().st_size / 2**20, "load_with_edit_s": load_edit, "load_from_cache_s": load_cached}
    return [meta] + rows


def render(info: dict, dlib_rows: list[dict], local: list[dict]) -> str:
    meta, rows = local[0], local[1:]
    lines = [
        "# Face encoding benchmark",
        "",
        f"Machine: {info['host']}, {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"onnxruntime {info['onnxruntime']} ({', '.join(info['providers'])}); CPU only. "
        f"Date: {info['date']}. Medians of {info['repeats']} runs after a warm-up.",
        "",
        "## Detection + embedding (dlib, real photos)",
        "",
        "| backend | input | faces | ms / image | faces / s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['backend']} | {r['input']} | {r['faces']} | {r['ms_per_image']:.0f} | {r['faces_per_s']:.1f} |"
              for r in dlib_rows]
    lines += [
        "",
        "## Local feature output vs embedding alone (ArcFace-sized network, onnxruntime CPU)",
        "",
        f"Network: {meta['params_mb']:.0f} MB ONNX, local map {tuple(meta['local_shape'])}, embedding "
        f"{meta['embedding_dim']}-d. Load with graph edit {meta['load_with_edit_s']:.2f} s, "
        f"from cache {meta['load_from_cache_s']:.2f} s.",
        "",
        "| batch | original (emb only) ms | edited, emb only ms | edited, emb + local ms | local overhead | faces / s (emb + local) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['batch']} | {r['original_ms']:.1f} | {r['edited_embedding_ms']:.1f} | "
              f"{r['edited_embedding_local_ms']:.1f} | {r['local_overhead_pct']:+.1f}% | "
              f"{r['faces_per_s_embedding_local']:.1f} |" for r in rows]
    lines += ["", "All three columns run the same forward pass (the edit adds an output, no compute), so the "
              "overhead should be ~0; differences of tens of percent either way are load from other processes "
              "on a shared machine, even with interleaved runs.",
              "", "The insightface detector (SCRFD) cannot be timed here: no antelopev2/buffalo_l pack is "
              "available offline.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    info = machine() | {"date": time.strftime("%Y-%m-%d"), "repeats": args.repeats}
    dlib_rows = bench_dlib(args.repeats)
    local = bench_local_cost(args.repeats, tuple(int(b) for b in args.batches.split(",")))
    text = render(info, dlib_rows, local)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "faces.md").write_text(text)
        (RESULTS / "faces.json").write_text(json.dumps({"machine": info, "dlib": dlib_rows, "local": local},
                                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
