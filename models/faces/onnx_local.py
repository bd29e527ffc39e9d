"""Expose a recognition network's last 2-D feature map (InstantFamily's local feature, sec. 3.3).

insightface's ArcFace wrapper asserts a single output, so we load the recognition ONNX with ``onnx``,
add the last 4-D tensor before the flatten/fc as a second graph output, and run it with onnxruntime.
The user's file is only read. The edited graph lives in memory, or in a cache file keyed by the
SHA-256 of the original, so a later load skips the edit and shape inference.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelFileError
from .providers import create_session

logger = logging.getLogger("instantfamily.faces")

CACHE_FORMAT = 1


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_onnx(path: str | os.PathLike):
    """``onnx.load`` with an error that names the file and says what to do."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, truncated file, not ONNX at all
        raise ModelFileError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}). The file is corrupted "
            "or incomplete; download it again."
        ) from exc


def insightface_input_norm(model) -> tuple[float, float]:
    """(mean, std) for the recognition input, by insightface's own rule (ArcFaceONNX.__init__):
    MXNet-converted models normalise inside the graph (Sub and Mul among the first 8 nodes)."""
    find_sub = find_mul = False
    for node in model.graph.node[:8]:
        if node.name.startswith("Sub") or node.name.startswith("_minus"):
            find_sub = True
        if node.name.startswith("Mul") or node.name.startswith("_mul"):
            find_mul = True
    return (0.0, 1.0) if (find_sub and find_mul) else (127.5, 127.5)


def _ranks(model) -> dict[str, int]:
    """Tensor name -> rank, from onnx shape inference (ranks survive dynamic batch/spatial dims)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - custom ops: fall back to what the file declares
        inferred = model
    ranks: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks


def find_local_tensor(model) -> str:
    """Name of the last 4-D tensor the embedding output depends on (the map before flatten/fc).

    ONNX nodes are stored in topological order, so "last" = produced by the highest node index among
    the embedding's ancestors.
    """
    g = model.graph
    if not g.output:
        raise ModelFileError("recognition model has no outputs")
    producer = {out: i for i, node in enumerate(g.node) for out in node.output}
    ranks = _ranks(model)
    target = g.output[0].name
    seen: set[str] = set()
    stack = [target]
    best: tuple[int, str] | None = None
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        idx = producer[name]
        if name != target and ranks.get(name) == 4 and (best is None or idx > best[0]):
            best = (idx, name)
        stack.extend(i for i in g.node[idx].input if i)
    if best is None:
        # Shape inference could not rank the tensors: the input of a Flatten is 4-D by construction.
        for idx in sorted((producer[n] for n in seen if n in producer), reverse=True):
            node = g.node[idx]
            if node.op_type == "Flatten" and node.input and node.input[0] in producer:
                return node.input[0]
        raise ModelFileError(
            "recognition model: found no 4-D feature map before the embedding; this does not look "
            "like an ArcFace-style recognition network (expected conv layers, then flatten/fc)"
        )
    return best[1]


def add_local_output(model) -> tuple[object, str]:
    """Copy of ``model`` with the local feature map as an extra output; returns (model, tensor name)."""
    import onnx

    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    name = find_local_tensor(edited)
    if name not in {o.name for o in edited.graph.output}:
        edited.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return edited, name


@dataclass
class LocalFeatureModel:
    """A recognition network that returns (global embedding, local feature map) in one forward pass."""

    session: object
    input_name: str
    embedding_output: str
    local_output: str
    input_size: tuple[int, int]      # (H, W) of the aligned crop the network expects
    input_mean: float
    input_std: float
    local_shape: tuple[int, int, int]  # (L, L', d_lf), read from the model's real output
    embedding_dim: int
    source_path: str
    sha256: str
    from_cache: bool
    fixed_batch: int | None = None   # some exports fix the batch axis to 1: then run crops one by one

    def blob(self, crops: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32, as insightface feeds ArcFace."""
        x = (np.asarray(crops, dtype=np.float32) - self.input_mean) / self.input_std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def run(self, crops: np.ndarray, with_local: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings (N, d_gf) raw (not normalised) and local maps (N, L, L, d_lf) or None."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.shape[1:3] != self.input_size:
            raise ValueError(f"aligned crops must be {self.input_size}, got {crops.shape[1:3]}")
        names = [self.embedding_output, self.local_output] if with_local else [self.embedding_output]
        if self.fixed_batch is not None and len(crops) != self.fixed_batch:
            parts = [self.run(crops[i : i + 1], with_local) for i in range(len(crops))]
            emb = np.concatenate([p[0] for p in parts])
            return emb, (np.concatenate([p[1] for p in parts]) if with_local else None)
        outs = self.session.run(names, {self.input_name: self.blob(crops)})
        emb = outs[0].reshape(len(crops), -1).astype(np.float32)
        if not with_local:
            return emb, None
        # NCHW -> N x L x L x d_lf (the layout Face.local documents)
        return emb, np.ascontiguousarray(outs[1].transpose(0, 2, 3, 1).astype(np.float32))


def _cache_paths(cache_dir: Path, sha: str) -> tuple[Path, Path]:
    return cache_dir / f"{sha[:32]}.local.onnx", cache_dir / f"{sha[:32]}.local.json"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_local_feature_model(
    path: str | os.PathLike,
    providers: list[str],
    cache_dir: str | os.PathLike | None = None,
) -> LocalFeatureModel:
    """Load a recognition ONNX with its local feature map exposed. ``path`` is never written."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"recognition model not found: {path}")
    sha = file_sha256(path)
    meta: dict | None = None
    session = None
    from_cache = False
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        model_file, meta_file = _cache_paths(cache, sha)
        if model_file.is_file() and meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
                if meta.get("format") != CACHE_FORMAT or meta.get("source_sha256") != sha:
                    raise ValueError("stale cache entry")
                session = create_session(model_file, providers)
                from_cache = True
            except Exception as exc:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
                logger.info("InstantFamily faces: rebuilding local-feature cache %s (%s)", model_file, exc)
                meta, session = None, None
    if session is None:
        model = load_onnx(path)
        if len(model.graph.input) < 1 or len(model.graph.output) < 1:
            raise ModelFileError(f"{path}: ONNX graph has no input or output; not a recognition model")
        edited, local_name = add_local_output(model)
        mean, std = insightface_input_norm(model)
        meta = {
            "format": CACHE_FORMAT,
            "source_sha256": sha,
            "source_name": path.name,
            "embedding_output": model.graph.output[0].name,
            "local_output": local_name,
            "input_mean": mean,
            "input_std": std,
        }
        data = edited.SerializeToString()
        try:
            session = create_session(data, providers)
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{path}: onnxruntime cannot run this model ({exc})") from exc
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                model_file, meta_file = _cache_paths(cache, sha)
                _atomic_write(model_file, data)
                _atomic_write(meta_file, json.dumps(meta, indent=1).encode())
            except OSError as exc:  # read-only folder: work from memory, just slower next time
                logger.warning("InstantFamily faces: cannot write cache in %s (%s)", cache, exc)
    assert meta is not None
    inp = session.get_inputs()[0]
    shape = inp.shape
    h, w = (shape[2], shape[3]) if len(shape) == 4 and all(isinstance(v, int) for v in shape[2:4]) else (112, 112)
    lfm = LocalFeatureModel(
        session=session,
        input_name=inp.name,
        embedding_output=meta["embedding_output"],
        local_output=meta["local_output"],
        input_size=(int(h), int(w)),
        input_mean=float(meta["input_mean"]),
        input_std=float(meta["input_std"]),
        local_shape=(0, 0, 0),
        embedding_dim=0,
        source_path=str(path),
        sha256=sha,
        from_cache=from_cache,
        fixed_batch=shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None,
    )
    # L and d_lf are read from one real forward pass, not assumed (glintr100 and w600k_r50: 7x7x512).
    emb, loc = lfm.run(np.zeros((1, h, w, 3), np.uint8))
    assert loc is not None
    lfm.local_shape = tuple(int(v) for v in loc.shape[1:])  # type: ignore[assignment]
    lfm.embedding_dim = int(emb.shape[1])
    return lfm
