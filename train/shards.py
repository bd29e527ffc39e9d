"""The training-shard format: what ``train prepare`` writes and ``train fit`` reads.

WebDataset tar shards, one sample per prepared image, files sharing the sample key:

- ``<key>.jpg`` or ``<key>.png``: the RGB image at the training resolution (square, center-cropped);
- ``<key>.txt``: the caption (UTF-8);
- ``<key>.json``: ``{"source": str, "size": [W, H], "face_person": [person index per face, -1 if none]}``;
- ``<key>.features.safetensors``: tensors (safetensors bytes, never pickle):
    face_boxes (F, 4) float32 pixels x0 y0 x1 y1; face_kps (F, 5, 2) float32 pixels;
    face_embedding (F, d_gf) float16; face_local (F, L, L, d_lf) float16 (absent for encoders without a
    local map, e.g. dlib); pose (P, 18, 3) float32 OpenPose-18 pixel x, y, confidence (P may be 0);
    latent (4, H/8, W/8) float16 and text_embedding (T, d_k) float16 when prepare cached them.

``manifest.json`` beside the shards says what they hold (encoder, widths, resolution, counts, versions,
config) and lists the finished shards; ``train fit`` refuses shards whose manifest disagrees with its setup.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

SHARD_FORMAT = "instantfamily-shards"
SHARD_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.safetensors"
IMAGE_KEYS = ("jpg", "png")


class ShardError(ValueError):
    """Shards that are not what the trainer expects; the message says what and what to do."""


@dataclass
class Sample:
    """One prepared image: pixels, caption and everything the trainer needs to build a step's batch."""

    key: str
    image: np.ndarray                     # (H, W, 3) uint8 RGB
    caption: str
    face_boxes: np.ndarray                # (F, 4) float32
    face_kps: np.ndarray                  # (F, 5, 2) float32
    face_embedding: np.ndarray            # (F, d_gf) float32
    face_local: np.ndarray | None         # (F, L, L, d_lf) float32 or None
    pose: np.ndarray                      # (P, 18, 3) float32
    face_person: list[int] = field(default_factory=list)
    source: str = ""
    latent: np.ndarray | None = None      # (4, H/8, W/8) float32
    text_embedding: np.ndarray | None = None  # (T, d_k) float32

    @property
    def n_faces(self) -> int:
        return int(self.face_boxes.shape[0])


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def encode_sample(sample: Sample, image_format: str = "jpg") -> dict[str, object]:
    """A dict for ``webdataset.TarWriter.write``."""
    if image_format not in IMAGE_KEYS:
        raise ValueError(f"image_format must be one of {IMAGE_KEYS}, got {image_format!r}")
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(sample.image)
    img.save(buf, format="JPEG", quality=95) if image_format == "jpg" else img.save(buf, format="PNG")
    tensors = {
        "face_boxes": _tensor(sample.face_boxes, torch.float32),
        "face_kps": _tensor(sample.face_kps, torch.float32),
        "face_embedding": _tensor(sample.face_embedding, torch.float16),
        "pose": _tensor(sample.pose.reshape(-1, 18, 3), torch.float32),
    }
    if sample.face_local is not None:
        tensors["face_local"] = _tensor(sample.face_local, torch.float16)
    if sample.latent is not None:
        tensors["latent"] = _tensor(sample.latent, torch.float16)
    if sample.text_embedding is not None:
        tensors["text_embedding"] = _tensor(sample.text_embedding, torch.float16)
    meta = {"source": sample.source, "size": [int(sample.image.shape[1]), int(sample.image.shape[0])],
            "face_person": [int(p) for p in sample.face_person]}
    return {"__key__": sample.key, image_format: buf.getvalue(), "txt": sample.caption.encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8"), FEATURES: save_safetensors(tensors)}


def decode_sample(raw: dict[str, object]) -> Sample:
    """The inverse of :func:`encode_sample`, from webdataset's raw (undecoded) dict."""
    from PIL import Image

    key = str(raw.get("__key__", "?"))
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    missing = [k for k in ("txt", "json", FEATURES) if k not in raw] + ([] if image_key else ["jpg|png"])
    if missing:
        raise ShardError(f"sample {key!r} in {raw.get('__url__', '?')} lacks {missing}; re-run train prepare")
    image = np.asarray(Image.open(io.BytesIO(raw[image_key])).convert("RGB"))
    meta = json.loads(bytes(raw["json"]).decode("utf-8"))
    t = load_safetensors(bytes(raw[FEATURES]))

    def arr(name: str) -> np.ndarray | None:
        return t[name].float().numpy() if name in t else None

    return Sample(
        key=key, image=image, caption=bytes(raw["txt"]).decode("utf-8"),
        face_boxes=arr("face_boxes"), face_kps=arr("face_kps"), face_embedding=arr("face_embedding"),
        face_local=arr("face_local"), pose=arr("pose"), face_person=list(meta.get("face_person", [])),
        source=meta.get("source", ""), latent=arr("latent"), text_embedding=arr("text_embedding"),
    )


@dataclass
class Manifest:
    """What a folder of shards holds. ``shards`` maps a shard file name to its sample count."""

    face_encoder: str
    L: int                  # side of the local feature map (0 when the encoder has none)
    d_gf: int
    d_lf: int               # 0 when the encoder has no local map
    resolution: int
    shards: dict[str, int] = field(default_factory=dict)
    has_latents: bool = False
    has_text_embeddings: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, object] = field(default_factory=dict)
    format: str = SHARD_FORMAT
    format_version: int = SHARD_FORMAT_VERSION

    @property
    def samples(self) -> int:
        return sum(self.shards.values())

    @property
    def has_local(self) -> bool:
        return self.L > 0 and self.d_lf > 0

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST
        data = {**asdict(self), "samples": self.samples}
        atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ShardError(f"{folder}: no {MANIFEST}; point --data at a folder written by "
                             "`python -m instantfamily_nodes.train prepare`")
        data = json.loads(path.read_text())
        if data.get("format") != SHARD_FORMAT:
            raise ShardError(f"{path}: not an InstantFamily shard manifest (format {data.get('format')!r})")
        if int(data.get("format_version", 0)) > SHARD_FORMAT_VERSION:
            raise ShardError(f"{path}: format_version {data['format_version']} is newer than this pack reads "
                             f"({SHARD_FORMAT_VERSION}); update instantfamily_nodes")
        data.pop("samples", None)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def shard_paths(self, folder: str | os.PathLike) -> list[str]:
        """Absolute paths of the listed shards, in name order; an error names any that is missing."""
        folder = Path(folder)
        paths = [folder / name for name in sorted(self.shards)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ShardError(f"{folder}: shards listed in {MANIFEST} are missing: {missing[:3]}; re-run prepare")
        if not paths:
            raise ShardError(f"{folder}: the manifest lists no shards (prepare found no usable image)")
        return [str(p) for p in paths]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader never sees half a file (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes 0600; others on a cluster must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
