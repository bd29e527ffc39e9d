"""``train prepare``: photos (+ captions, poses) -> WebDataset training shards (:mod:`.shards` format).

Per photo: decode (EXIF-transposed, RGB), resize the short side to ``--resolution`` and center-crop a
square (torchvision's Resize + CenterCrop); faces are detected and encoded by the pack's face module on the
whole resized photo, then moved into the crop: a face with a keypoint outside the crop is cut off and
dropped (counted in the report). Pose: controlnet-aux's OpenPose (``--openpose DIR``), else a keypoint
JSON beside the photo, else none (P = 0). Faces are matched to people by position (pose.faceboxes).

Deterministic plan: the input list (sorted), split by ``index % world == rank``, then cut into shards of
``--shard-size`` inputs, named ``shard-r{rank:03d}-{n:06d}.tar``. A shard is written to a temp name and
renamed when complete, so a rerun with the same plan skips finished shards exactly. Each rank records its
shards in ``parts/r{rank:03d}.json``; the rank that completes last (or ``--merge``) writes ``manifest.json``
and ``report.csv`` for all ranks.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .shards import MANIFEST, Manifest, Sample, ShardError, atomic_write_bytes, encode_sample
from .sources import InputError, Item, ItemError, list_input, read_item

logger = logging.getLogger("instantfamily.train.prepare")

PARTS = "parts"
REPORT = "report.csv"
REPORT_COLUMNS = ("source", "action", "reason", "detail", "rank", "shard")
SHARD_RE = re.compile(r"^shard-r(\d{3})-(\d{6})\.tar$")
PLAN_VERSION = 1


class PrepareError(RuntimeError):
    """A run that cannot start or produced nothing usable; the message says why and what to do."""


def shard_name(rank: int, n: int) -> str:
    return f"shard-r{rank:03d}-{n:06d}.tar"


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=False, help="a folder of photos with same-name .txt captions (and optional "
                   ".pose.json keypoints), a .jsonl/.csv/.parquet manifest (columns path, caption[, pose]), or "
                   "img2dataset .tar shards (a folder, a file, or a brace pattern like 'data/{00000..00099}.tar')")
    p.add_argument("--out", required=True, help="output folder for shards, manifest.json and report.csv")
    p.add_argument("--resolution", type=int, default=512, help="square training size in pixels (paper: 512)")
    p.add_argument("--min-size", type=int, default=256,
                   help="skip photos whose shorter side is below this (upscaled photos train blur)")
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per shard")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="how the pixels are stored")
    p.add_argument("--face-encoder", default="insightface/antelopev2",
                   help="'insightface/<pack>' (global + local features; models under --models-root) or 'dlib' "
                   "(offline, global features only)")
    p.add_argument("--models-root", default=None,
                   help="insightface root holding models/<pack>/*.onnx (ComfyUI: ComfyUI/models/insightface)")
    p.add_argument("--provider", default="auto", help="onnxruntime provider for insightface: auto, CPU, CUDA, ...")
    p.add_argument("--det-sizes", default="640,480,320", help="insightface detection sizes tried in order")
    p.add_argument("--openpose", default=None, metavar="DIR",
                   help="folder with controlnet-aux's OpenPose weights (body_pose_model.pth, hand_pose_model.pth, "
                   "facenet.pth); without it, a keypoint JSON beside each photo is used when present")
    p.add_argument("--captioner", default=None, metavar="DIR",
                   help="local transformers image-to-text model folder to caption photos without a caption "
                   "(default: such photos are skipped and listed in the report)")
    p.add_argument("--checkpoint", default=None, help="SD1.5 checkpoint for --cache-latents / --cache-text")
    p.add_argument("--cache-latents", action="store_true", help="store VAE latents (saves ~1/3 of a step)")
    p.add_argument("--cache-text", action="store_true", help="store CLIP text embeddings")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, or the one holding the pack)")
    p.add_argument("--batch-size", type=int, default=16, help="batch for the VAE/CLIP/captioner passes")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes decoding photos and running the face encoder (0: in this process)")
    p.add_argument("--rank", type=int, default=None, help="this machine's part (default: $RANK, else 0)")
    p.add_argument("--world", type=int, default=None, help="number of parts (default: $WORLD_SIZE, else 1)")
    p.add_argument("--merge", action="store_true",
                   help="only merge the ranks' parts into manifest.json and report.csv (after all ranks finished)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard this rank's earlier shards when the inputs or settings changed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- per-image work (runs in workers)

@dataclass(frozen=True)
class Config:
    resolution: int = 512
    min_size: int = 256
    face_encoder: str = "insightface/antelopev2"
    models_root: str | None = None
    provider: str = "auto"
    det_sizes: tuple[int, ...] = (640, 480, 320)
    openpose: str | None = None
    captioner: bool = False


def build_encoder(cfg: Config):
    """The face encoder the nodes would load for the same choice (dlib, or an insightface pack)."""
    if cfg.face_encoder == "dlib":
        from ..models.faces.dlib_backend import DlibEncoder

        return DlibEncoder()
    backend, _, name = cfg.face_encoder.partition("/")
    if backend != "insightface" or not name:
        raise PrepareError(f"--face-encoder {cfg.face_encoder!r}: use 'insightface/<pack>' "
                           "(e.g. insightface/antelopev2) or 'dlib'")
    from ..models.faces.insightface_backend import InsightFaceEncoder, find_model_dir

    roots = [cfg.models_root] if cfg.models_root else []
    return InsightFaceEncoder(find_model_dir(name, roots), provider=cfg.provider, det_sizes=cfg.det_sizes, name=name)


def build_encoder_check(cfg: Config) -> None:
    backend, _, name = cfg.face_encoder.partition("/")
    if backend != "insightface" or not name:
        raise PrepareError(f"--face-encoder {cfg.face_encoder!r}: use 'insightface/<pack>' "
                           "(e.g. insightface/antelopev2) or 'dlib'")
    from ..models.faces.insightface_backend import find_model_dir

    find_model_dir(name, [cfg.models_root] if cfg.models_root else [])


@dataclass
class Geometry:
    """Resize (short side -> R) then center crop: source pixel (x, y) -> (x * sx - ox, y * sy - oy)."""

    size: tuple[int, int]      # resized (W', H')
    offset: tuple[int, int]    # crop (ox, oy)
    resolution: int


def resize_and_crop(image: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """(resized whole photo, the square crop, geometry). The short side becomes exactly ``resolution``."""
    from PIL import Image

    h, w = image.shape[:2]
    k = resolution / min(h, w)
    size = (resolution, max(resolution, round(h * k))) if w <= h else (max(resolution, round(w * k)), resolution)
    resized = image if size == (w, h) else np.asarray(
        Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    ox, oy = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    crop = np.ascontiguousarray(resized[oy:oy + resolution, ox:ox + resolution])
    return resized, crop, Geometry(size=size, offset=(ox, oy), resolution=resolution)


def decode_image(data: bytes) -> np.ndarray:
    """Photo bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied, transparency over white."""
    from PIL import Image, ImageOps

    from ..models.faces.image import to_rgb_uint8

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # a truncated file fails here, not later
        im = ImageOps.exif_transpose(im)
        has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        return to_rgb_uint8(np.asarray(im.convert("RGBA" if has_alpha else "RGB")))


def crop_faces(faces, geo: Geometry) -> tuple[list, int]:
    """Faces moved into crop pixels; a face with any of its 5 keypoints outside the crop is cut off."""
    shift = np.array(geo.offset, np.float32)
    kept, cut = [], 0
    for f in faces:
        kps = f.kps - shift
        if (kps < 0).any() or (kps > geo.resolution).any():
            cut += 1
            continue
        kept.append((f, (f.box - np.tile(shift, 2)).astype(np.float32), kps.astype(np.float32)))
    return kept, cut


def pose_in_crop(value: object, orig_hw: tuple[int, int], geo: Geometry,
                 detected=None) -> np.ndarray:
    """People -> (P, 18, 3) crop pixels (missing joints all 0); people with no joint inside the crop are
    dropped. ``value``: a POSE_KEYPOINT JSON value (normalised to the photo) or a detected PoseFrame
    (normalised to the resized photo)."""
    from ..pose.keypoints import frames_from_pose_keypoint

    if detected is not None:
        people = detected.people
    else:
        frames = frames_from_pose_keypoint(value, canvas_hw=orig_hw)
        people = frames[0].people
    W, H = geo.size
    ox, oy = geo.offset
    R = geo.resolution
    out = []
    for p in people:
        b = p.body.astype(np.float32).copy()
        present = b[:, 2] > 0
        b[:, 0] = b[:, 0] * W - ox
        b[:, 1] = b[:, 1] * H - oy
        b[~present] = 0.0
        inside = present & (b[:, 0] >= 0) & (b[:, 0] < R) & (b[:, 1] >= 0) & (b[:, 1] < R)
        if inside.any():
            out.append(b)
    return np.stack(out).astype(np.float32) if out else np.zeros((0, 18, 3), np.float32)


def faces_to_people(pose: np.ndarray, boxes: np.ndarray, resolution: int) -> list[int]:
    """For each face, the person (row of ``pose``) whose head it is, or -1 (pose.faceboxes' matching)."""
    from ..pose.faceboxes import face_box_from_pose, match_faces
    from ..pose.keypoints import Person

    if len(pose) == 0 or len(boxes) == 0:
        return [-1] * len(boxes)
    people = []
    for b in pose:
        n = b.copy()
        n[:, :2] /= float(resolution)
        people.append(Person(body=n))
    pose_boxes = [face_box_from_pose(p, (resolution, resolution)) for p in people]
    face_person = [-1] * len(boxes)
    for person, face in enumerate(match_faces(pose_boxes, list(boxes))):
        if face is not None:
            face_person[face] = person
    return face_person


class Processor:
    """One worker's models (loaded once) and the per-photo pipeline."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        if cfg.openpose:
            from ..pose.detect import find_openpose_dir, load_detector

            self.openpose_dir = find_openpose_dir([cfg.openpose])
            load_detector(self.openpose_dir)
        else:
            self.openpose_dir = None

    def __call__(self, index: int, item: Item) -> dict:
        from ..models.faces.encode import encode_faces
        from ..models.faces.errors import NoFaceError
        from ..pose.keypoints import PoseFormatError

        cfg = self.cfg
        data = read_item(item)
        if data.caption is None and not cfg.captioner:
            raise ItemError("missing caption", "no caption (.txt beside the photo or manifest column); "
                            "add one or pass --captioner DIR")
        try:
            image = decode_image(data.image_bytes)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
            raise ItemError("corrupt image", f"{type(e).__name__}: {e}") from e
        h, w = image.shape[:2]
        if min(h, w) < cfg.min_size:
            raise ItemError("too small", f"{w}x{h} px; the shorter side must be >= --min-size {cfg.min_size}")
        resized, crop, geo = resize_and_crop(image, cfg.resolution)
        try:
            faces = encode_faces(self.encoder, resized, faces_per_image="all", order="left_to_right")
        except NoFaceError as e:
            raise ItemError("no face", str(e)) from e
        kept, cut = crop_faces(faces, geo)
        if not kept:
            raise ItemError("no face", f"{cut} face(s) found, all cut off by the square crop")
        boxes = np.stack([b for _, b, _ in kept])
        pose_source = "none"
        try:
            if self.openpose_dir is not None:
                from ..pose.detect import detect_pose

                pose = pose_in_crop(None, (h, w), geo, detected=detect_pose(resized, self.openpose_dir))
                pose_source = "openpose"
            elif data.pose is not None:
                pose = pose_in_crop(data.pose, (h, w), geo)
                pose_source = "json"
            else:
                pose = np.zeros((0, 18, 3), np.float32)
        except PoseFormatError as e:
            raise ItemError("invalid pose JSON", str(e)) from e
        local = [f.local for f, _, _ in kept]
        return {
            "index": index, "source": item.source, "image": crop, "caption": data.caption,
            "face_boxes": boxes, "face_kps": np.stack([k for _, _, k in kept]),
            "face_embedding": np.stack([f.embedding for f, _, _ in kept]).astype(np.float32),
            "face_local": None if any(v is None for v in local) else np.stack(local).astype(np.float32),
            "pose": pose, "face_person": faces_to_people(pose, boxes, cfg.resolution),
            "faces_cut": cut, "pose_source": pose_source,
        }


_WORKER: dict = {}


def _init_worker(cfg: Config) -> None:
    # A failing initializer would make multiprocessing respawn workers forever: keep the error instead.
    try:
        _WORKER["processor"] = Processor(cfg)
    except Exception as e:  # noqa: BLE001
        _WORKER["fatal"] = f"{type(e).__name__}: {e}"


def _work(task: tuple[int, Item]) -> tuple[str, int, object]:
    index, item = task
    if "fatal" in _WORKER:
        return "fatal", index, _WORKER["fatal"]
    try:
        return "ok", index, _WORKER["processor"](index, item)
    except ItemError as e:
        return "skip", index, (item.source, e.reason, e.detail)
    except Exception as e:  # noqa: BLE001 - one bad photo must never end the run
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return "skip", index, (item.source, "error", f"{tb} (please report if the photo looks fine)")


# ---------------------------------------------------------------- plan and parts

@dataclass
class Part:
    """One rank's progress: finished shards, their report rows and statistics (``parts/rNNN.json``)."""

    rank: int
    world: int
    plan: str
    complete: bool = False
    header: dict = field(default_factory=dict)      # face_encoder, L, d_gf, d_lf, has_latents, ...
    shards: dict[str, int] = field(default_factory=dict)
    rows: dict[str, list[list]] = field(default_factory=dict)    # shard -> report rows
    stats: dict[str, dict] = field(default_factory=dict)         # shard -> counts
    listing: list[list] = field(default_factory=list)            # problems found while listing (rank 0)
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @staticmethod
    def path(out: Path, rank: int) -> Path:
        return out / PARTS / f"r{rank:03d}.json"

    def save(self, out: Path) -> None:
        atomic_write_bytes(self.path(out, self.rank), json.dumps(self.__dict__, indent=1).encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> "Part":
        return cls(**json.loads(path.read_text()))


def plan_digest(sources_digest: str, settings: dict) -> str:
    """Hash of everything that decides which input lands in which shard and what a shard holds."""
    key = json.dumps({"v": PLAN_VERSION, "sources": sources_digest, **settings}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def count_tar_samples(path: Path) -> int:
    with tarfile.open(path) as tf:
        return len({m.name.split("/")[-1].split(".")[0] for m in tf if m.isfile()})


def versions(extra: dict | None = None) -> dict:
    from importlib import metadata

    out = {}
    for dist in ("instantfamily-nodes", "torch", "numpy", "pillow", "webdataset", "insightface", "onnxruntime",
                 "onnxruntime-gpu", "dlib-bin", "controlnet-aux", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    out.update(extra or {})
    return out


# ---------------------------------------------------------------- merge

def merge(out: Path, require_complete: bool = True) -> tuple[bool, Manifest | None]:
    """Join all ranks' parts into ``manifest.json`` and ``report.csv``: (True, the manifest, or None when
    no rank wrote a sample). (False, None), writing nothing, while some rank is unfinished, unless
    ``require_complete`` raises instead."""
    files = sorted((out / PARTS).glob("r[0-9][0-9][0-9].json"))
    if not files:
        raise PrepareError(f"{out}: no {PARTS}/rNNN.json; run prepare first")
    parts = [Part.load(f) for f in files]
    world, plan = parts[0].world, parts[0].plan
    bad = [p.rank for p in parts if p.world != world or p.plan != plan]
    if bad:
        raise PrepareError(f"{out}: parts of ranks {bad} come from another plan (other inputs or settings); "
                           "rerun those ranks with the same --input and options, or use a new --out")
    have = {p.rank for p in parts if p.complete}
    missing = sorted(set(range(world)) - have)
    if missing:
        if require_complete:
            raise PrepareError(f"{out}: ranks {missing} of {world} have not finished; run them "
                               f"(--rank N --world {world}), then --merge")
        return False, None
    parts.sort(key=lambda p: p.rank)
    headers = [p.header for p in parts if p.header.get("face_encoder")]
    rows = [list(r) + [0, ""] for r in parts[0].listing]
    for p in parts:
        for shard in sorted(p.rows):
            rows += [list(r) + [p.rank, shard] for r in p.rows[shard]]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(REPORT_COLUMNS)
    w.writerows(rows)
    atomic_write_bytes(out / REPORT, buf.getvalue().encode("utf-8"))
    if not headers:
        (out / MANIFEST).unlink(missing_ok=True)
        return True, None
    for hd in headers[1:]:
        diff = {k: (headers[0].get(k), hd.get(k)) for k in set(hd) | set(headers[0]) if headers[0].get(k) != hd.get(k)}
        if diff:
            raise PrepareError(f"{out}: ranks disagree on {diff}; prepare all ranks with the same encoder and options")
    h = headers[0]
    stats: dict = {}
    for p in parts:
        for s in p.stats.values():
            for k, v in s.items():
                if isinstance(v, dict):
                    d = stats.setdefault(k, {})
                    for kk, vv in v.items():
                        d[kk] = d.get(kk, 0) + vv
                else:
                    stats[k] = stats.get(k, 0) + v
    manifest = Manifest(
        face_encoder=h["face_encoder"], L=h["L"], d_gf=h["d_gf"], d_lf=h["d_lf"], resolution=h["resolution"],
        shards={name: n for p in parts for name, n in p.shards.items() if n > 0},
        has_latents=h["has_latents"], has_text_embeddings=h["has_text_embeddings"], versions=parts[0].versions,
        config={**parts[0].config, "plan": plan, "world": world, "stats": stats,
                "latent_channels": h.get("latent_channels"), "d_k": h.get("d_k")})
    manifest.save(out)
    return True, manifest


# ---------------------------------------------------------------- the run

class ShardOut:
    """One shard being written: a temp file renamed into place when complete."""

    def __init__(self, out: Path, name: str, image_format: str) -> None:
        import webdataset as wds

        self.final = out / name
        self.tmp = out / f".{name}.{os.getpid()}.tmp"
        self.file = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.file)
        self.image_format = image_format
        self.count = 0

    def write(self, sample: Sample) -> None:
        self.writer.write(encode_sample(sample, self.image_format))
        self.count += 1

    def close(self) -> None:
        self.writer.close()   # webdataset closes the stream it was given
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001
            pass
        self.tmp.unlink(missing_ok=True)


def _header(result: dict, cfg: Config, encoder_name: str, caches) -> dict:
    emb, local = result["face_embedding"], result["face_local"]
    return {
        "face_encoder": encoder_name, "d_gf": int(emb.shape[1]),
        "L": int(local.shape[1]) if local is not None else 0, "d_lf": int(local.shape[3]) if local is not None else 0,
        "resolution": cfg.resolution, "has_latents": bool(caches and caches.vae is not None),
        "has_text_embeddings": bool(caches and caches.clip is not None),
        "latent_channels": int(caches.vae.latent_channels) if caches and caches.vae is not None else None,
        "d_k": 768 if caches and caches.clip is not None else None,
    }


def _encoder_name(cfg: Config) -> str:
    return "dlib" if cfg.face_encoder == "dlib" else cfg.face_encoder


def prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.merge:
        return _final_message(out, merge(out, require_complete=True)[1])
    if not args.input:
        raise PrepareError("--input is required (or --merge)")
    rank = args.rank if args.rank is not None else env_int("RANK", 0)
    world = args.world if args.world is not None else env_int("WORLD_SIZE", 1)
    if not (world >= 1 and 0 <= rank < world):
        raise PrepareError(f"--rank {rank} --world {world}: need 0 <= rank < world")
    if args.shard_size < 1 or args.resolution < 64 or args.resolution % 8:
        raise PrepareError("--shard-size must be >= 1 and --resolution a multiple of 8, >= 64")
    if (args.cache_latents or args.cache_text) and not args.checkpoint:
        raise PrepareError("--cache-latents / --cache-text need --checkpoint (an SD1.5 checkpoint)")
    try:
        det_sizes = tuple(int(s) for s in re.split(r"[,\s]+", args.det_sizes.strip()) if s)
    except ValueError:
        raise PrepareError(f"--det-sizes {args.det_sizes!r}: expected sizes like 640,480,320") from None
    cfg = Config(resolution=args.resolution, min_size=args.min_size, face_encoder=args.face_encoder,
                 models_root=args.models_root, provider=args.provider, det_sizes=det_sizes,
                 openpose=args.openpose, captioner=bool(args.captioner))

    if cfg.face_encoder != "dlib" and args.workers > 0:
        build_encoder_check(cfg)    # a missing model folder is reported now, not by every worker
    if cfg.openpose:
        from ..pose.detect import find_openpose_dir

        find_openpose_dir([cfg.openpose])
    listing = list_input(args.input, keep=lambda i: i % world == rank)
    settings = {"resolution": cfg.resolution, "min_size": cfg.min_size, "shard_size": args.shard_size,
                "world": world, "face_encoder": cfg.face_encoder, "image_format": args.image_format,
                "openpose": bool(cfg.openpose), "captioner": bool(args.captioner),
                "latents": bool(args.cache_latents), "text": bool(args.cache_text),
                "checkpoint": Path(args.checkpoint).name if args.checkpoint else None}
    plan = plan_digest(listing.digest, settings)
    mine = listing.items
    shards = [mine[k:k + args.shard_size] for k in range(0, len(mine), args.shard_size)]

    out.mkdir(parents=True, exist_ok=True)
    part_path = Part.path(out, rank)
    part = Part.load(part_path) if part_path.is_file() else None
    if part is not None and (part.plan != plan or part.world != world):
        if not args.overwrite:
            raise PrepareError(
                f"{out} holds rank {rank}'s shards from another plan (the input list or settings changed: "
                f"{part.config.get('settings')} -> {settings}); use a new --out, or --overwrite to discard them")
        for f in out.glob(f"shard-r{rank:03d}-*.tar"):
            f.unlink()
        part = None
    for f in out.glob(f".shard-r{rank:03d}-*.tmp"):   # left by a killed run
        f.unlink()
    if part is None:
        part = Part(rank=rank, world=world, plan=plan)
    part.complete = False
    part.config = {"input": str(args.input), "settings": settings, "face_encoder": cfg.face_encoder,
                   "models_root": cfg.models_root, "det_sizes": list(det_sizes), "openpose": cfg.openpose,
                   "captioner": args.captioner, "checkpoint": args.checkpoint, "source_kind": listing.kind,
                   "inputs": listing.count}
    if rank == 0:
        part.listing = [[s, "skipped", r, d] for s, r, d in listing.problems]
    # A shard renamed into place by a run killed before it updated the part file still counts.
    for n in range(len(shards)):
        name = shard_name(rank, n)
        if (out / name).is_file() and name not in part.shards:
            part.shards[name] = count_tar_samples(out / name)
            part.rows[name] = []
    todo = [n for n in range(len(shards)) if not (out / shard_name(rank, n)).is_file()]
    done_inputs = sum(len(shards[n]) for n in range(len(shards)) if n not in set(todo))
    print(f"prepare rank {rank}/{world}: {listing.count} inputs ({listing.kind}), {len(mine)} for this rank in "
          f"{len(shards)} shards; {len(shards) - len(todo)} already finished ({done_inputs} inputs)", flush=True)

    caches = captioner = None
    if todo and args.checkpoint and (args.cache_latents or args.cache_text):
        from .caches import Encoders, comfyui_version

        caches = Encoders(args.checkpoint, args.cache_latents, args.cache_text, args.comfyui)
        part.versions = versions({"comfyui": comfyui_version(caches.comfyui)})
    else:
        part.versions = part.versions or versions()
    if todo and args.captioner:
        from .captioner import Captioner

        captioner = Captioner(args.captioner)
    part.save(out)

    if todo:
        _run_shards(shards, todo, cfg, args, out, rank, part, caches, captioner, _encoder_name(cfg))
    part.complete = True
    part.save(out)
    done, manifest = merge(out, require_complete=False)
    if not done:
        print(f"rank {rank} done; manifest.json is written by the last rank to finish "
              f"(or run prepare --out {out} --merge once all {world} ranks are done)", flush=True)
        written = sum(part.shards.values())
        if written == 0 and mine:
            print(f"warning: rank {rank} wrote no sample; see the rows of rank {rank} in {out / REPORT} "
                  "once merged, or parts/", file=sys.stderr)
        return 0
    return _final_message(out, manifest)


def _final_message(out: Path, manifest: Manifest | None) -> int:
    if manifest is None or manifest.samples == 0:
        print(f"error: no usable photo: every input was skipped; the reasons are in {out / REPORT}",
              file=sys.stderr)
        return 1
    stats = manifest.config.get("stats", {})
    skipped = stats.get("skipped", {})
    print(f"prepared {manifest.samples} samples in {len(manifest.shards)} shards ({out / MANIFEST}); "
          f"skipped {sum(skipped.values())}" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})"
                                                if skipped else "")
          + f"; faces cut off by the crop: {stats.get('faces_cut', 0)}; report: {out / REPORT}", flush=True)
    return 0


def _run_shards(shards, todo, cfg, args, out, rank, part, caches, captioner, encoder_name) -> None:
    """Process the unfinished shards in order; the next shard's inputs are queued while this one's results
    come in (workers never wait at a shard boundary, and at most two shards of inputs are in flight)."""
    from tqdm import tqdm

    if args.workers > 0:
        # spawn: CUDA (onnxruntime, torch) does not survive fork, and each worker loads the models once.
        pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(cfg,))
        chunk = max(1, min(8, args.shard_size // (args.workers * 4)))

        def submit(n: int):
            return pool.imap(_work, shards[n], chunksize=chunk)
    else:
        pool = None
        _init_worker(cfg)

        def submit(n: int):
            return map(_work, shards[n])
    bar = tqdm(total=sum(len(shards[n]) for n in todo), unit="img", desc=f"prepare r{rank}",
               disable=args.no_progress, dynamic_ncols=True, smoothing=0.05)
    current: ShardOut | None = None
    batch: list[dict] = []
    rows: list[list] = []
    stats: dict = {}
    n_skipped = 0

    def flush() -> None:
        if not batch:
            return
        if captioner is not None:
            need = [r for r in batch if r["caption"] is None]
            for r, c in zip(need, captioner([r["image"] for r in need]) if need else []):
                r["caption"] = c or None
            for r in [r for r in need if r["caption"] is None]:
                rows.append([r["source"], "skipped", "missing caption", "the captioner gave an empty caption"])
                stats["written"] -= 1
                stats["faces"] -= len(r["face_boxes"])
                stats["pose"][r["pose_source"]] -= 1
                stats["skipped"]["missing caption"] = stats["skipped"].get("missing caption", 0) + 1
                batch.remove(r)
            if not batch:
                return
        images = np.stack([r["image"] for r in batch])
        latents = caches.latents(images) if caches is not None and caches.vae is not None else None
        texts = caches.text([r["caption"] for r in batch]) if caches is not None and caches.clip is not None else None
        for j, r in enumerate(batch):
            current.write(Sample(
                key=f"{r['index']:09d}", image=r["image"], caption=r["caption"], face_boxes=r["face_boxes"],
                face_kps=r["face_kps"], face_embedding=r["face_embedding"], face_local=r["face_local"],
                pose=r["pose"], face_person=r["face_person"], source=r["source"],
                latent=None if latents is None else latents[j], text_embedding=None if texts is None else texts[j]))
        batch.clear()

    try:
        queued = [submit(todo[0])] if todo else []
        for k, n in enumerate(todo):
            results = queued.pop(0)
            if k + 1 < len(todo):
                queued.append(submit(todo[k + 1]))
            current = ShardOut(out, shard_name(rank, n), args.image_format)
            rows, stats = [], {"written": 0, "skipped": {}, "faces": 0, "faces_cut": 0, "pose": {}}
            for kind, index, payload in results:
                if kind == "fatal":
                    raise PrepareError(f"the face encoder could not be loaded: {payload}")
                if kind == "skip":
                    source, reason, detail = payload
                    rows.append([source, "skipped", reason, detail])
                    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
                    n_skipped += 1
                else:
                    r = payload
                    check = _header(r, cfg, encoder_name, caches)
                    if not part.header:
                        part.header = check
                    elif check != part.header:
                        raise PrepareError(f"{r['source']}: face features {check} differ from earlier photos' "
                                           f"{part.header}; this should not happen with one encoder")
                    if r["faces_cut"]:
                        rows.append([r["source"], "kept", "faces cut off by the crop",
                                     f"{r['faces_cut']} face(s) dropped, {len(r['face_boxes'])} kept"])
                    stats["written"] += 1
                    stats["faces"] += len(r["face_boxes"])
                    stats["faces_cut"] += r["faces_cut"]
                    stats["pose"][r["pose_source"]] = stats["pose"].get(r["pose_source"], 0) + 1
                    batch.append(r)
                    if len(batch) >= args.batch_size:
                        flush()
                bar.update(1)
                bar.set_postfix(skipped=n_skipped, refresh=False)
            flush()
            current.close()
            name = current.final.name
            part.shards[name] = current.count
            part.rows[name] = rows
            part.stats[name] = stats
            part.save(out)
            current = None
    except BaseException:
        if current is not None:
            current.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def run(args: argparse.Namespace) -> int:
    from ..models.faces.errors import FaceEncodingError
    from ..pose.detect import OpenPoseWeightsMissing
    from .caches import CheckpointError
    from .captioner import CaptionerError

    started = time.perf_counter()
    try:
        code = prepare(args)
    except (PrepareError, InputError, ShardError, CheckpointError, CaptionerError, FaceEncodingError,
            OpenPoseWeightsMissing, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("prepare took %.1f s", time.perf_counter() - started)
    return code
