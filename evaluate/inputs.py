"""The CLI's input folder and manifest, read and checked (every error names the file and the fix).

A run folder::

    run/
      refs/            one photo per ID; ID order = file-name order (00_anna.jpg, 01_ben.jpg)
      gen/             generated images
      manifest.json    optional: per-image prompt, IDs and where each ID was generated
      prompts.json     optional without a manifest: {"0001.png": "a photo of ...", ...}
      prompts.txt      optional without a manifest: one prompt per line, images in file-name order

manifest.json::

    {"coords": "auto",                       # box/point units: pixels | normalized | auto
     "prompt": "two people at the beach",    # default prompt for images that have none
     "images": [
       {"file": "gen/0001.png", "prompt": "...", "ids": [0, 1],      # ids: indices or ref names
        "boxes": [[x0, y0, x1, y1], [x0, y0, x1, y1]]},               # one per ID, in ID order
       {"file": "gen/0002.png", "points": [[120, 200], [380, 210]]},  # or face centres
       {"file": "gen/0003.png", "masks": ["masks/0003_0.png", "masks/0003_1.png"]}]}

``ids`` defaults to every reference in order. Without boxes/points/masks, faces are matched to IDs by
similarity (greedy). Paths are relative to the run folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EvaluationInputError
from .matching import COORDS, mask_to_region, region_from_spec

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REGION_KEYS = ("boxes", "points", "masks")


@dataclass
class Item:
    """One generated image and what it was generated with."""

    file: Path
    name: str                         # as shown in reports (path relative to the run folder)
    prompt: str | None
    ids: list[int]                    # reference indices, in ID order
    region_kind: str | None = None    # "boxes" | "points" | "masks" | None
    region_specs: list | None = None  # one per ID
    coords: str = "auto"

    def regions(self, size: tuple[int, int]) -> list[np.ndarray] | None:
        """One boolean region per ID at the image's (H, W), or None when positions are unknown."""
        if self.region_specs is None:
            return None
        out = []
        for n, spec in enumerate(self.region_specs):
            where = f"{self.name}: {self.region_kind}[{n}]"
            if self.region_kind == "masks":
                out.append(mask_to_region(load_mask(spec, where), size))
            else:
                out.append(region_from_spec(spec, size, where, self.coords))
        return out


@dataclass
class EvalSet:
    root: Path
    ref_files: list[Path]
    id_names: list[str]
    items: list[Item]

    @property
    def has_prompts(self) -> bool:
        return any(it.prompt for it in self.items)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def load_image(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            # EXIF rotation: phone photos as references are stored sideways with a rotate flag.
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError) as exc:
        raise EvaluationInputError(f"{path}: cannot be read as an image ({exc})") from exc


def load_mask(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise EvaluationInputError(f"{where}: mask file {path} does not exist")
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvaluationInputError(f"{what} {path}: not valid JSON ({exc})") from exc


def _resolve(root: Path, p: str | os.PathLike) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else root / p


def _references(root: Path, refs: Path | None, listed: list | None) -> list[Path]:
    if listed:
        files = [_resolve(root, f) for f in listed]
        for f in files:
            if not f.is_file():
                raise EvaluationInputError(f"manifest 'refs': {f} does not exist")
        return files
    folder = refs or root / "refs"
    if not folder.is_dir():
        raise EvaluationInputError(f"references: folder {folder} does not exist; put one photo per ID in "
                                   f"{root / 'refs'}/ (ID order = file-name order) or pass --refs DIR")
    files = list_images(folder)
    if not files:
        raise EvaluationInputError(f"references: no images ({', '.join(IMAGE_EXTS)}) in {folder}; "
                                   "put one photo per ID there (ID order = file-name order)")
    return files


def _parse_ids(raw, names: list[str], where: str) -> list[int]:
    if raw is None:
        return list(range(len(names)))
    if not isinstance(raw, list) or not raw:
        raise EvaluationInputError(f"{where}: 'ids' must be a non-empty list of reference indices or names")
    out = []
    for v in raw:
        if isinstance(v, str) and not v.isdigit():
            if v not in names:
                raise EvaluationInputError(f"{where}: ID name {v!r} is not a reference; references are {names}")
            out.append(names.index(v))
        else:
            i = int(v)
            if not 0 <= i < len(names):
                raise EvaluationInputError(f"{where}: ID {i} is out of range; there are {len(names)} references (0-{len(names) - 1})")
            out.append(i)
    if len(set(out)) != len(out):
        raise EvaluationInputError(f"{where}: 'ids' lists a reference twice: {raw}")
    return out


def _item_from_manifest(root: Path, entry: dict, k: int, names: list[str], coords: str, prompt: str | None) -> Item:
    where = f"manifest image {k}"
    if not isinstance(entry, dict) or "file" not in entry:
        raise EvaluationInputError(f"{where}: each entry needs at least a 'file' (path of the generated image)")
    file = _resolve(root, entry["file"])
    where = f"manifest image {k} ({entry['file']})"
    if not file.is_file():
        raise EvaluationInputError(f"{where}: file {file} does not exist")
    ids = _parse_ids(entry.get("ids"), names, where)
    given = [key for key in REGION_KEYS if entry.get(key) is not None]
    if len(given) > 1:
        raise EvaluationInputError(f"{where}: give one of {', '.join(REGION_KEYS)}, not {' and '.join(given)}")
    kind = given[0] if given else None
    specs = None
    if kind:
        specs = entry[kind]
        if not isinstance(specs, list) or len(specs) != len(ids):
            n = len(specs) if isinstance(specs, list) else "no list of"
            raise EvaluationInputError(f"{where}: {n} {kind} for {len(ids)} IDs; give one per ID, in ID order")
        if kind == "masks":
            specs = [_resolve(root, m) for m in specs]
    c = entry.get("coords", coords)
    if c not in COORDS:
        raise EvaluationInputError(f"{where}: coords must be one of {', '.join(COORDS)}, got {c!r}")
    name = os.path.relpath(file, root) if file.is_relative_to(root) else str(file)
    return Item(file=file, name=name, prompt=entry.get("prompt", prompt), ids=ids, region_kind=kind,
                region_specs=specs, coords=c)


def _prompts_for(root: Path, files: list[Path], names: list[str]) -> list[str | None]:
    pj, pt = root / "prompts.json", root / "prompts.txt"
    if pj.is_file():
        data = _read_json(pj, "prompts")
        if isinstance(data, list):
            prompts = [str(p) for p in data]
        elif isinstance(data, dict):
            missing = [f.name for f in files if f.name not in data and str(f) not in data]
            if missing:
                raise EvaluationInputError(f"prompts {pj}: no prompt for {len(missing)} image(s): {missing[:5]}; "
                                           "give one entry per generated image, keyed by file name")
            return [str(data.get(f.name, data.get(str(f)))) for f in files]
        else:
            raise EvaluationInputError(f"prompts {pj}: expected a list or a {{file name: prompt}} object")
        src = pj
    elif pt.is_file():
        prompts = [ln.strip() for ln in pt.read_text(encoding="utf-8").splitlines() if ln.strip()]
        src = pt
    else:
        return [None] * len(files)
    if len(prompts) == 1:
        return prompts * len(files)
    if len(prompts) != len(files):
        raise EvaluationInputError(
            f"prompts {src}: {len(prompts)} prompts for {len(files)} generated images; give one prompt per image "
            "(in file-name order) or a single prompt for all")
    return prompts


def load_eval_set(root: str | os.PathLike, refs: str | os.PathLike | None = None, gen: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None) -> EvalSet:
    """Read a run folder (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EvaluationInputError(f"run folder {root} does not exist")
    man_path = Path(manifest).expanduser() if manifest else root / "manifest.json"
    if manifest and not man_path.is_file():
        raise EvaluationInputError(f"--manifest {manifest}: no such file")
    man = _read_json(man_path, "manifest") if man_path.is_file() else None
    if man is not None and not isinstance(man, dict):
        raise EvaluationInputError(f"manifest {man_path}: expected a JSON object with an 'images' list")
    ref_files = _references(root, Path(refs).expanduser() if refs else None, (man or {}).get("refs"))
    names = [f.stem for f in ref_files]
    if man is not None and "images" in man:
        entries = man["images"]
        if not isinstance(entries, list) or not entries:
            raise EvaluationInputError(f"manifest {man_path}: 'images' must be a non-empty list")
        coords = man.get("coords", "auto")
        items = [_item_from_manifest(root, e, k, names, coords, man.get("prompt")) for k, e in enumerate(entries)]
    else:
        folder = Path(gen).expanduser() if gen else root / "gen"
        if not folder.is_dir():
            raise EvaluationInputError(f"generated images: folder {folder} does not exist; put them in "
                                       f"{root / 'gen'}/ or pass --gen DIR")
        files = list_images(folder)
        if not files:
            raise EvaluationInputError(f"generated images: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
        prompts = _prompts_for(root, files, names)
        default = (man or {}).get("prompt")
        items = [Item(file=f, name=os.path.relpath(f, root) if f.is_relative_to(root) else str(f),
                      prompt=p if p is not None else default, ids=list(range(len(names)))) for f, p in zip(files, prompts)]
    return EvalSet(root=root, ref_files=ref_files, id_names=names, items=items)
