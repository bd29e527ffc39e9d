"""Input readers for ``train prepare``: a folder of photos, a manifest file, or img2dataset tar shards.

Every reader turns its input into a deterministic list of :class:`Item` (same input -> same list, same
order), so the assignment of inputs to ranks and output shards is exact and a rerun can skip finished
shards. An item only says where the bytes are; they are read in the worker that processes it
(:func:`read_item`), so a bad file costs one report line, never the run.

Beside each photo (or sample of a tar) may sit:
- ``<name>.txt``: the caption (UTF-8);
- ``<name>.pose.json``, or a ``<name>.json`` that holds OpenPose people (a POSE_KEYPOINT list, or a frame
  dict with ``"people"``): the pose. A ``<name>.json`` without ``"people"`` is metadata (img2dataset
  writes one per sample) and is ignored.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_EXTS = (".jsonl", ".csv", ".parquet")
POSE_SUFFIX = ".pose.json"


class InputError(ValueError):
    """The --input cannot be read at all (missing, empty, wrong kind); the message says what to do."""


@dataclass(frozen=True)
class Part:
    """Where one file of an item is: a path on disk, or a byte range inside a tar file."""

    path: str
    offset: int = -1      # >= 0: byte offset of the member's data in the tar ``path``
    size: int = -1

    def read(self) -> bytes:
        if self.offset < 0:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"tar is truncated: {len(data)} of {self.size} bytes")
        return data


@dataclass(frozen=True)
class Item:
    """One input photo. ``caption`` set directly (manifest column) wins over ``caption_part``."""

    source: str                       # what the report calls it: a path, or ``tarpath:key``
    image: Part | None
    caption: str | None = None
    caption_part: Part | None = None
    pose_part: Part | None = None     # a pose JSON (``.pose.json`` or a people-holding ``.json``)
    meta_part: Part | None = None     # a ``.json`` that may be metadata or a pose (decided on read)
    problem: str = ""                 # set when the listing already knows the item is unusable


@dataclass
class Listing:
    """The items of an input this process keeps, plus what is known of all of them.

    Every input gets an index in listing order; only those ``keep(index)`` accepts are stored (a rank
    holds its own share, not the whole list), while ``count`` and ``digest`` (a hash of every source, for
    the rerun plan) cover all inputs."""

    kind: str                                                   # "folder", "manifest" or "tar"
    keep: Callable[[int], bool] = lambda i: True
    items: list[tuple[int, Item]] = field(default_factory=list)
    count: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (source, reason, detail)
    _hash: object = field(default_factory=hashlib.sha256, repr=False)

    def add(self, source: str, make: Callable[[], Item]) -> None:
        self._hash.update(source.encode("utf-8", "surrogateescape") + b"\0")
        if self.keep(self.count):
            self.items.append((self.count, make()))
        self.count += 1

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()


# ---------------------------------------------------------------- listing

def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def expand_input(spec: str) -> list[Path]:
    """``--input`` as paths: a path, or a brace pattern like ``shards/{00000..00099}.tar`` (as webdataset)."""
    import braceexpand

    return [Path(p).expanduser() for p in braceexpand.braceexpand(spec)]


def list_input(spec: str, keep: Callable[[int], bool] = lambda i: True) -> Listing:
    """The items of ``--input``: a folder of photos (or of .tar shards), a .jsonl/.csv/.parquet manifest,
    a .tar file or a brace pattern of them. ``keep(index)``: which inputs to store (see :class:`Listing`)."""
    paths = expand_input(spec)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"--input {spec}: not found: {', '.join(missing[:3])}")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        images = [p for p in files if _is_image(p)]
        tars = [p for p in files if p.name.endswith(".tar")]
        if images and tars:
            raise InputError(f"--input {folder}: holds both photos and .tar shards; point --input at one kind "
                             f"(e.g. {tars[0].parent} for the shards)")
        if tars:
            return list_tars(tars, keep)
        if not images:
            raise InputError(f"--input {folder}: no photos found (looked for {', '.join(IMAGE_EXTS)} in the folder "
                             "and its subfolders) and no .tar shards; put photos with same-name .txt captions there")
        return list_folder(folder, images, keep)
    if all(p.is_file() and p.name.endswith(".tar") for p in paths):
        return list_tars(paths, keep)
    if len(paths) == 1 and paths[0].suffix.lower() in MANIFEST_EXTS:
        return list_manifest(paths[0], keep)
    raise InputError(f"--input {spec}: expected a folder of photos, a folder of .tar shards, a .tar file (or a "
                     f"brace pattern of them), or a manifest ({', '.join(MANIFEST_EXTS)})")


def _sidecars(image: Path) -> dict[str, Part | None]:
    stem = image.with_suffix("")
    txt, pose, meta = stem.with_suffix(".txt"), Path(str(stem) + POSE_SUFFIX), stem.with_suffix(".json")
    return {"caption_part": Part(str(txt)) if txt.is_file() else None,
            "pose_part": Part(str(pose)) if pose.is_file() else None,
            "meta_part": Part(str(meta)) if meta.is_file() else None}


def list_folder(folder: Path, images: list[Path] | None = None, keep: Callable[[int], bool] = lambda i: True) -> Listing:
    images = images if images is not None else sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p))
    listing = Listing("folder", keep)
    for p in images:
        listing.add(str(p), lambda p=p: Item(source=str(p), image=Part(str(p)), **_sidecars(p)))
    return listing


def _manifest_rows(path: Path) -> Iterator[dict]:
    """Rows one at a time (a manifest of millions of rows is never held whole)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {n} is not JSON ({e.msg}); each line must be "
                                     '{"path": ..., "caption": ...}') from e
                if not isinstance(row, dict):
                    raise InputError(f"{path}: line {n} is not a JSON object with path and caption")
                yield row
        return
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the manifest "
                         "to .jsonl or .csv with columns path, caption") from None
    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def list_manifest(path: Path, keep: Callable[[int], bool] = lambda i: True) -> Listing:
    """Rows with ``path`` (relative to the manifest's folder or absolute), ``caption`` and optionally
    ``pose`` (a keypoint JSON path)."""
    base = path.parent
    listing = Listing("manifest", keep)

    def item(p: Path, row: dict) -> Item:
        caption = row.get("caption")
        # pandas-written files give NaN for an empty caption cell
        caption = None if caption is None or (isinstance(caption, float) and math.isnan(caption)) else str(caption)
        pose = row.get("pose")
        side = _sidecars(p)
        problem = "" if p.is_file() else "file not found"
        return Item(source=str(p), image=Part(str(p)) if not problem else None, caption=caption,
                    caption_part=side["caption_part"] if caption is None else None,
                    pose_part=Part(str(base / str(pose))) if pose else side["pose_part"],
                    meta_part=None if pose else side["meta_part"], problem=problem)

    for n, row in enumerate(_manifest_rows(path)):
        if n == 0 and "path" not in row:
            raise InputError(f"{path}: no 'path' column (columns: {sorted(row)}); expected path, caption")
        p = Path(str(row.get("path") or ""))
        p = p if p.is_absolute() else base / p
        listing.add(str(p), lambda p=p, row=row: item(p, row))
    if listing.count == 0:
        raise InputError(f"{path}: the manifest has no rows")
    return listing


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name; the rest is the kind."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def list_tars(tars: list[Path], keep: Callable[[int], bool] = lambda i: True) -> Listing:
    """Samples of img2dataset-style tars (``key.jpg`` + ``key.txt`` [+ ``key.json``]) by member headers only
    (tarfile seeks over the data). A tar cut off mid-file keeps the samples whose headers were read; a
    member whose data is cut short fails when read, and the listing reports where the tar ends."""
    listing = Listing("tar", keep)
    for tar_path in tars:
        groups: dict[str, dict[str, Part]] = {}
        order: list[str] = []
        try:
            with tarfile.open(tar_path, mode="r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, kind = _split_key(m.name)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][kind] = Part(str(tar_path), m.offset_data, m.size)
            end = os.path.getsize(tar_path)
            last = max((p.offset + p.size for g in groups.values() for p in g.values()), default=0)
            if last > end:
                listing.problems.append((str(tar_path), "truncated tar",
                                         f"the file ends at byte {end}, inside its last member; "
                                         "samples before it are used"))
        except (tarfile.TarError, EOFError, OSError) as e:
            listing.problems.append((str(tar_path), "unreadable tar" if not groups else "truncated tar",
                                     f"{type(e).__name__}: {e}; {len(order)} samples before it are used"))
        for key in order:
            g = groups[key]
            image = next((g[k] for k in ("jpg", "jpeg", "png", "webp") if k in g), None)
            listing.add(f"{tar_path}:{key}", lambda key=key, g=g, image=image: Item(
                source=f"{tar_path}:{key}", image=image, caption_part=g.get("txt"), pose_part=g.get("pose.json"),
                meta_part=g.get("json"), problem="" if image is not None else "no image in the sample"))
    return listing


# ---------------------------------------------------------------- reading one item

@dataclass
class ItemData:
    image_bytes: bytes
    caption: str | None       # None: no caption (missing, or empty)
    pose: object | None       # parsed JSON holding people, or None


class ItemError(ValueError):
    """One item cannot be used; ``reason`` is the short report category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _holds_people(value: object) -> bool:
    if isinstance(value, dict):
        return "people" in value
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "people" in value[0]


def read_item(item: Item) -> ItemData:
    """The bytes of an item's photo, its caption and its pose JSON; :class:`ItemError` says what is wrong."""
    if item.problem:
        raise ItemError(item.problem, item.source)
    try:
        image_bytes = item.image.read()
    except (OSError, EOFError) as e:
        raise ItemError("unreadable image", f"{type(e).__name__}: {e}") from e
    caption = item.caption
    if caption is None and item.caption_part is not None:
        try:
            caption = item.caption_part.read().decode("utf-8")
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise ItemError("unreadable caption", f"{item.caption_part.path}: {type(e).__name__}: {e}") from e
    if caption is not None:
        caption = caption.strip() or None
    pose = None
    for part, must in ((item.pose_part, True), (item.meta_part, False)):
        if part is None:
            continue
        try:
            value = json.loads(part.read().decode("utf-8"))
        except (ValueError, OSError, EOFError) as e:
            if must:
                raise ItemError("invalid pose JSON", f"{part.path}: {type(e).__name__}: {e}") from e
            continue  # a broken metadata .json beside an img2dataset sample is not our business
        if must or _holds_people(value):
            pose = value
            break
    return ItemData(image_bytes=image_bytes, caption=caption, pose=pose)
