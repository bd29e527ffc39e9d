"""From user images to a FACES value: detection ladder, face selection, encoding, ordering."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .base import Detection, Encoded, FaceEncoder
from .errors import NoFaceError, NoLocalFeaturesError
from .image import MIN_SIDE, as_image_list
from .ordering import order_faces, parse_faces_per_image
from .types import Face, Faces

# The padded retry: a face that fills the whole frame is missed by anchor-based detectors; a border of
# this fraction of the image on each side brings it back into their range.
PAD_FRACTION = 0.25


def _area(d: Detection) -> float:
    return max(0.0, float(d.box[2] - d.box[0])) * max(0.0, float(d.box[3] - d.box[1]))


def most_prominent(dets: list[Detection], k: int) -> list[Detection]:
    """The k faces a "photo of this person" means: among faces at least half as large (in area) as the
    largest, the most confident first; then the rest by size. Size alone is not enough: dlib's HOG
    boxes come in a few fixed sizes, and a weak false hit can be as large as the real face."""
    big = 0.5 * max(_area(d) for d in dets)
    return sorted(dets, key=lambda d: (_area(d) >= big, d.score if _area(d) >= big else _area(d)),
                  reverse=True)[:k]


@dataclass
class Search:
    """Where the ladder found faces: ``dets`` are in the coordinates of ``image``, which is the input
    itself or, after the padded retry, a padded copy whose input starts at ``offset`` (x, y)."""

    image: np.ndarray
    dets: list[Detection]
    offset: tuple[int, int] = (0, 0)

    def encode(self, encoder: FaceEncoder, dets: list[Detection] | None = None) -> list[tuple[Detection, Encoded]]:
        """Embed ``dets`` (default: all) in the image they were found in, where every backend's
        landmarks are exact (dlib keeps its 68 points from detection), then move box and keypoints
        back into the input's coordinates (boxes clipped to it)."""
        dets = self.dets if dets is None else dets
        encoded = encoder.encode(self.image, dets)
        px, py = self.offset
        if (px, py) == (0, 0):
            return list(zip(dets, encoded))
        h, w = self.image.shape[0] - 2 * py, self.image.shape[1] - 2 * px
        shift = np.array([px, py], np.float32)
        moved = [Detection(box=np.clip(d.box - np.tile(shift, 2), 0, [w, h, w, h]).astype(np.float32),
                           kps=(d.kps - shift).astype(np.float32), score=d.score) for d in dets]
        return list(zip(moved, encoded))


def search_faces(encoder: FaceEncoder, image: np.ndarray, want: int = 1) -> Search:
    """Climb the encoder's ladder until at least ``want`` faces appear (the rung with the most faces
    wins); with none at any rung, one padded retry. ``dets`` is empty when nothing was found."""
    best: list[Detection] = []
    for rung in encoder.ladder:
        dets = encoder.detect(image, rung)
        if len(dets) > len(best):
            best = dets
        if len(best) >= want:
            break
    if best:
        return Search(image, best)
    h, w = image.shape[:2]
    py, px = int(round(h * PAD_FRACTION)), int(round(w * PAD_FRACTION))
    padded = np.pad(image, ((py, py), (px, px), (0, 0)))
    return Search(padded, encoder.detect(padded, encoder.ladder[0]), (px, py))


def detect_with_ladder(encoder: FaceEncoder, image: np.ndarray, index: int, total: int) -> Search:
    """:func:`search_faces` for a user's photo: too small or no face is a clear error naming the image."""
    h, w = image.shape[:2]
    where = f"image {index + 1} of {total}"
    if min(h, w) < MIN_SIDE:
        raise NoFaceError(f"{where} is only {w}x{h} px; a face needs at least {MIN_SIDE} px: use a larger photo",
                          index)
    found = search_faces(encoder, image)
    if found.dets:
        return found
    tried = ", ".join(str(r) for r in encoder.ladder)
    hint = "try a larger, frontal, well-lit photo"
    if int(image.max()) == int(image.min()):
        hint = f"the image is one flat colour (all pixels {int(image.max())}): is the right image connected?"
    raise NoFaceError(f"{where}: no face found after {encoder.ladder_label} {tried} and a padded retry; {hint}",
                      index)


def encode_faces(
    encoder: FaceEncoder,
    images: np.ndarray | Sequence[np.ndarray],
    faces_per_image: str | Sequence = "auto",
    order: str = "left_to_right",
    index_list: str | Sequence[int] = "",
    progress: Callable[[int, int], None] | None = None,
) -> Faces:
    """Detect, select, encode and order faces.

    ``images``: one image, a BxHxWxC batch or a list (sizes may differ), uint8 or float 0-1, gray/RGB/RGBA.
    ``faces_per_image``: see :func:`ordering.parse_faces_per_image` ('auto': one image -> all faces,
    several -> the largest of each). ``progress(done, total)`` is called after each image.
    """
    imgs = as_image_list(images)
    counts = parse_faces_per_image(faces_per_image, len(imgs))
    found: list[Face] = []
    for i, (img, k) in enumerate(zip(imgs, counts)):
        search = detect_with_ladder(encoder, img, i, len(imgs))
        dets = search.dets
        if k is not None:
            if len(dets) < k:
                raise NoFaceError(
                    f"image {i + 1} of {len(imgs)}: asked for {k} faces, found {len(dets)}; "
                    "lower faces_per_image or use a photo where every face is visible", i)
            dets = most_prominent(dets, k)
        for d, e in search.encode(encoder, dets):
            found.append(Face(box=d.box.astype(np.float32), kps=d.kps.astype(np.float32), embedding=e.embedding,
                              local=e.local, crop=e.crop, score=float(d.score), image_index=i,
                              image_size=(int(img.shape[0]), int(img.shape[1]))))
        if progress is not None:
            progress(i + 1, len(imgs))
    return Faces(faces=order_faces(found, order, index_list), encoder=encoder.name)


def require_local(faces: Faces, step: str) -> None:
    """For steps that need the local feature map: a clear error naming the IDs without one."""
    missing = [i for i, f in enumerate(faces) if f.local is None]
    if missing or not len(faces):
        raise NoLocalFeaturesError(
            f"{step} needs the local face features (the recognition network's 2-D feature map), but ID(s) "
            f"{missing} have no local feature map: these faces come from "
            f"'{faces.encoder or 'an encoder without one'}', which has none. "
            "Encode the faces with the insightface backend (antelopev2 or buffalo_l)."
        )


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Identity similarity of two embeddings (any backend; 1 = same direction)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
