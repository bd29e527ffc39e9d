"""One image's scores (faces -> IDs -> metrics) and the aggregate over a run."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import EvaluationInputError
from .identity import GenFace
from .matching import DEFAULT_MIN_OVERLAP, largest, match_by_regions, match_greedy
from .metrics import fastcomposer_score, multi_sim, single_sims

MATCH_MODES: tuple[str, ...] = ("auto", "regions", "greedy")


@dataclass
class ImageScore:
    name: str
    ids: list[int]                        # reference index of each ID in this image, in ID order
    faces: list[GenFace]                  # every face detected in the image
    assignment: list[int | None]          # per ID: index into ``faces``, None when missing
    match: str                            # how faces were matched: "regions" or "greedy"
    single_sim: list[float]               # eq. 10 per ID, 0 when missing
    identity: float                       # mean SingleSim
    mixing: float | None                  # mean (1 - cos) over pairs of the IDs' faces
    multi_sim: float | None               # eq. 11 generalised; None for one ID
    fastcomposer: float                   # greedy-min, 0 when a face is missing
    greedy_agrees: bool | None = None     # with regions: did similarity alone pick the same faces?
    prompt: str | None = None
    text_sim: float | None = None         # eq. 9, when CLIP is available
    size: tuple[int, int] = (0, 0)        # (H, W)
    extra: dict = field(default_factory=dict)

    @property
    def missing(self) -> int:
        return sum(a is None for a in self.assignment)

    def to_dict(self, id_names: Sequence[str]) -> dict:
        return {
            "image": self.name, "prompt": self.prompt, "size": list(self.size), "match": self.match,
            "faces_detected": len(self.faces), "faces_missing": self.missing,
            "identity": self.identity, "mixing": self.mixing, "multi_sim": self.multi_sim,
            "fastcomposer": self.fastcomposer, "text_sim": self.text_sim, "greedy_agrees": self.greedy_agrees,
            "ids": [{
                "id": n, "ref": r, "name": id_names[r], "single_sim": s,
                "box": None if a is None else [round(float(v), 1) for v in self.faces[a].box],
            } for n, (r, a, s) in enumerate(zip(self.ids, self.assignment, self.single_sim))],
        }


def score_image(name: str, refs: Sequence[np.ndarray], ids: Sequence[int], faces: list[GenFace],
                regions: Sequence[np.ndarray] | None = None, match: str = "auto",
                min_overlap: float = DEFAULT_MIN_OVERLAP, size: tuple[int, int] = (0, 0)) -> ImageScore:
    """Scores of one generated image. ``refs``: every reference embedding; ``ids``: which of them this
    image was generated with, in ID order; ``regions``: one boolean HxW region per ID, or None."""
    if match not in MATCH_MODES:
        raise EvaluationInputError(f"match: expected one of {', '.join(MATCH_MODES)}, got {match!r}")
    if not ids:
        raise EvaluationInputError(f"{name}: no IDs; list the references this image was generated with")
    my_refs = [refs[i] for i in ids]
    boxes = [f.box for f in faces]
    embs = [f.embedding for f in faces]
    if regions is not None and len(regions) != len(ids):
        raise EvaluationInputError(f"{name}: {len(regions)} masks/boxes for {len(ids)} IDs; give one per ID, in ID order")
    if match == "regions" and regions is None:
        raise EvaluationInputError(f"{name}: match=regions needs the ID masks, boxes or points it was generated with; "
                                   "add them to the manifest or use match=greedy")
    dets = [f.score for f in faces]
    greedy = match_greedy(my_refs, embs, boxes, dets)
    if regions is not None and match != "greedy":
        assignment, used = match_by_regions(boxes, regions, min_overlap), "regions"
        agrees = assignment == greedy
    else:
        assignment, used, agrees = greedy, "greedy", None
    gens = [None if a is None else embs[a] for a in assignment]
    identity, mixing, ms = multi_sim(my_refs, gens)
    sims = single_sims(my_refs, gens)
    # FastComposer's own protocol, whatever the matching above: the N largest faces, greedy, min.
    fc = fastcomposer_score(my_refs, [embs[j] for j in largest(boxes, len(ids), dets)])
    return ImageScore(name=name, ids=list(ids), faces=faces, assignment=assignment, match=used, single_sim=sims,
                      identity=identity, mixing=mixing, multi_sim=ms, fastcomposer=fc, greedy_agrees=agrees,
                      size=size)


def _stats(vals: Sequence[float | None]) -> dict:
    v = np.array([x for x in vals if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    # population std, as FastComposer reports it
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def _block(scores: Sequence[ImageScore]) -> dict:
    per_face = [s for sc in scores for s in sc.single_sim]
    found = [s for sc in scores for s, a in zip(sc.single_sim, sc.assignment) if a is not None]
    total = sum(len(sc.ids) for sc in scores)
    missing = sum(sc.missing for sc in scores)
    agree = [sc.greedy_agrees for sc in scores if sc.greedy_agrees is not None]
    return {
        "images": len(scores),
        "faces_expected": total,
        "faces_missing": missing,
        "face_missing_rate": missing / total if total else None,
        "images_with_missing_face": sum(sc.missing > 0 for sc in scores),
        "single_sim": _stats(per_face),
        "single_sim_detected": _stats(found),
        "identity": _stats([sc.identity for sc in scores]),
        "multi_sim": _stats([sc.multi_sim for sc in scores]),
        "mixing": _stats([sc.mixing for sc in scores]),
        "fastcomposer": _stats([sc.fastcomposer for sc in scores]),
        "text_sim": _stats([sc.text_sim for sc in scores]),
        "greedy_agrees_rate": (sum(agree) / len(agree)) if agree else None,
    }


def aggregate(scores: Sequence[ImageScore], id_names: Sequence[str]) -> dict:
    """Run-level numbers: overall, by number of IDs per image, and per reference."""
    if not scores:
        raise EvaluationInputError("no generated images were scored")
    by_n: dict[int, list[ImageScore]] = {}
    for sc in scores:
        by_n.setdefault(len(sc.ids), []).append(sc)
    per_ref = []
    for r, name in enumerate(id_names):
        vals = [s for sc in scores for i, s in zip(sc.ids, sc.single_sim) if i == r]
        miss = sum(1 for sc in scores for i, a in zip(sc.ids, sc.assignment) if i == r and a is None)
        if vals:
            per_ref.append({"ref": r, "name": name, "single_sim": _stats(vals), "faces_missing": miss})
    return {"overall": _block(scores), "by_n_ids": {str(n): _block(v) for n, v in sorted(by_n.items())},
            "per_reference": per_ref}
