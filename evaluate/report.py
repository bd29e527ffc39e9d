"""Outputs: scores.json (everything), images.csv / faces.csv (one row per image / per ID), summary.md
(the table for a paper) and contact sheets (references | generated, faces boxed in ID colours |
each ID's matched crop with its SingleSim)."""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..palette import id_color
from .run import Result
from .score import ImageScore

ROWS_PER_SHEET = 12
THUMB = 160          # px: reference and crop tiles
GEN_H = 240          # px: height of the generated image in a row


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _f(x, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def write_json(result: Result, path: Path) -> Path:
    path.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    return path


def write_csv(result: Result, out: Path) -> tuple[Path, Path]:
    images, faces = out / "images.csv", out / "faces.csv"
    with images.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt", "n_ids", "match", "faces_detected", "faces_missing", "identity", "mixing",
                    "multi_sim", "fastcomposer", "text_sim", "greedy_agrees", "backend"])
        for s in result.scores:
            w.writerow([s.name, s.prompt or "", len(s.ids), s.match, len(s.faces), s.missing, _f(s.identity),
                        _f(s.mixing), _f(s.multi_sim), _f(s.fastcomposer), _f(s.text_sim),
                        "" if s.greedy_agrees is None else int(s.greedy_agrees), result.meta["face_backend"]])
    with faces.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "id", "ref", "name", "detected", "single_sim", "x0", "y0", "x1", "y1"])
        for s in result.scores:
            for n, (r, a, v) in enumerate(zip(s.ids, s.assignment, s.single_sim)):
                box = ["", "", "", ""] if a is None else [f"{float(b):.1f}" for b in s.faces[a].box]
                w.writerow([s.name, n, r, result.id_names[r], int(a is not None), _f(v), *box])
    return images, faces


def _pm(stat: dict, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def summary_markdown(result: Result) -> str:
    """A paper-ready table: one row overall, one per number of IDs per image."""
    m, s = result.meta, result.summary
    head = ["IDs/image", "images", "SingleSim", "SingleSim (found)", "MultiSim", "FastComposer", "TextSim",
            "faces missing"]
    rows = []
    for label, b in [("all", s["overall"])] + [(n, b) for n, b in s["by_n_ids"].items()]:
        miss = b["face_missing_rate"]
        rows.append([str(label), str(b["images"]), _pm(b["single_sim"]), _pm(b["single_sim_detected"]),
                     _pm(b["multi_sim"]), _pm(b["fastcomposer"]), _pm(b["text_sim"]),
                     f"{b['faces_missing']}/{b['faces_expected']} ({100 * miss:.1f}%)" if miss is not None else "-"])
    lines = ["# Evaluation", "", f"- face backend: **{m['face_backend']}** ({m['similarity']})",
             f"- matching: {m['match']} (used: {', '.join(sorted({sc.match for sc in result.scores}))})",
             f"- {m['text_sim']}", f"- {m['conventions']}", f"- date: {m['date']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    agree = s["overall"]["greedy_agrees_rate"]
    if agree is not None:
        lines += ["", f"Similarity-only (greedy) matching picked the same faces as the positions in "
                      f"{100 * agree:.1f}% of images; lower means identities appear in the wrong place or swap."]
    lines += ["", "| reference | images | SingleSim | faces missing |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['single_sim']['n']} | {_pm(p['single_sim'])} | {p['faces_missing']} |"
              for p in s["per_reference"]]
    return "\n".join(lines) + "\n"


def _fit(img: np.ndarray, h: int) -> Image.Image:
    im = Image.fromarray(np.asarray(img, np.uint8)).convert("RGB")
    return im.resize((max(1, round(im.width * h / im.height)), h), Image.BILINEAR)


def annotate(image: np.ndarray, sc: ImageScore) -> np.ndarray:
    """The generated image with each ID's face boxed and labelled in its colour (IDs in the image's
    order); unmatched detections in grey."""
    im = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    d = ImageDraw.Draw(im)
    width = max(2, round(min(im.size) / 150))
    owner = {a: n for n, a in enumerate(sc.assignment) if a is not None}
    for j, f in enumerate(sc.faces):
        color = id_color(owner[j]) if j in owner else (128, 128, 128)
        x0, y0, x1, y1 = (float(v) for v in f.box)
        d.rectangle([x0, y0, x1, y1], outline=color, width=width)
        if j in owner:
            n = owner[j]
            label = f"{n}: {sc.single_sim[n]:.2f}"
            # sized for the image, not the face: the sheet shrinks the image to GEN_H px
            font = _font(max(12, round(im.height / 16)))
            tb = d.textbbox((x0, max(0.0, y0 - 2 * width)), label, font=font, anchor="lb")
            d.rectangle(tb, fill=color)
            d.text((x0, max(0.0, y0 - 2 * width)), label, font=font, anchor="lb",
                   fill=(0, 0, 0) if sum(color) > 382 else (255, 255, 255))
    return np.asarray(im)


def _tile(crop: np.ndarray | None, color, caption: str) -> Image.Image:
    t = Image.new("RGB", (THUMB, THUMB + 22), (255, 255, 255))
    d = ImageDraw.Draw(t)
    if crop is None:
        d.rectangle([4, 4, THUMB - 5, THUMB - 5], outline=color, width=3)
        d.line([4, 4, THUMB - 5, THUMB - 5], fill=color, width=3)
        d.line([4, THUMB - 5, THUMB - 5, 4], fill=color, width=3)
    else:
        t.paste(Image.fromarray(np.asarray(crop, np.uint8)).resize((THUMB - 8, THUMB - 8), Image.BILINEAR), (4, 4))
        d.rectangle([1, 1, THUMB - 2, THUMB - 2], outline=color, width=3)
    d.text((4, THUMB + 2), caption, fill=(0, 0, 0), font=_font(14))
    return t


def sheet_row(result: Result, sc: ImageScore, image: np.ndarray) -> Image.Image:
    refs = [_tile(result.ref_crops[r], id_color(n), f"ID {n}: {result.id_names[r]}"[:22]) for n, r in enumerate(sc.ids)]
    gen = _fit(annotate(image, sc), GEN_H)
    crops = [_tile(None if a is None else sc.faces[a].crop, id_color(n),
                   f"ID {n}: {'missing' if a is None else f'{sc.single_sim[n]:.3f}'}")
             for n, a in enumerate(sc.assignment)]
    ms = f"MultiSim {sc.multi_sim:.3f}  " if sc.multi_sim is not None else ""
    ts = f"  TextSim {sc.text_sim:.3f}" if sc.text_sim is not None else ""
    caption = f"{sc.name}   {ms}FastComposer {sc.fastcomposer:.3f}{ts}   [{sc.match}]"
    gap = 12
    w = gap + len(refs) * THUMB + gap * 2 + gen.width + gap * 2 + len(crops) * THUMB + gap
    h = 26 + max(GEN_H, THUMB + 22) + gap
    row = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(row)
    d.text((gap, 4), caption, fill=(0, 0, 0), font=_font(16))
    x = gap
    for t in refs:
        row.paste(t, (x, 26)); x += THUMB
    x += gap * 2
    row.paste(gen, (x, 26)); x += gen.width + gap * 2
    for t in crops:
        row.paste(t, (x, 26)); x += THUMB
    return row


def contact_sheets(result: Result, load: Callable[[int], np.ndarray], out: Path,
                   rows_per_sheet: int = ROWS_PER_SHEET) -> list[Path]:
    """contact_sheet.png (or _01, _02 ... for many images): references | generated | matched crops."""
    paths = []
    n_sheets = (len(result.scores) + rows_per_sheet - 1) // rows_per_sheet
    for p in range(n_sheets):
        idx = range(p * rows_per_sheet, min(len(result.scores), (p + 1) * rows_per_sheet))
        rows = [sheet_row(result, result.scores[k], load(k)) for k in idx]
        sheet = stack_rows(rows)
        path = out / ("contact_sheet.png" if n_sheets == 1 else f"contact_sheet_{p + 1:02d}.png")
        sheet.save(path)
        paths.append(path)
    return paths


def stack_rows(rows: Sequence[Image.Image]) -> Image.Image:
    w = max(r.width for r in rows)
    sheet = Image.new("RGB", (w, sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y)); y += r.height
    return sheet


def text_summary(result: Result) -> str:
    """Short plain-text scores (the node's text output and the CLI's last lines)."""
    o = result.summary["overall"]
    lines = [f"backend {result.meta['face_backend']}; {result.meta['text_sim']}"]
    for sc in result.scores:
        ids = ", ".join(f"ID{n} {'missing' if a is None else f'{v:.3f}'}"
                        for n, (a, v) in enumerate(zip(sc.assignment, sc.single_sim)))
        ms = f" MultiSim {sc.multi_sim:.3f}" if sc.multi_sim is not None else ""
        ts = f" TextSim {sc.text_sim:.3f}" if sc.text_sim is not None else ""
        lines.append(f"{sc.name}: SingleSim {ids};{ms} FastComposer {sc.fastcomposer:.3f}{ts} [{sc.match}]")
    lines.append(f"mean: SingleSim {_pm(o['single_sim'])}, MultiSim {_pm(o['multi_sim'])}, "
                 f"FastComposer {_pm(o['fastcomposer'])}, TextSim {_pm(o['text_sim'])}, "
                 f"faces missing {o['faces_missing']}/{o['faces_expected']}")
    return "\n".join(lines)
