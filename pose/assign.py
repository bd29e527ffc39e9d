"""Which stacked identity goes to which person.

An assignment is a list with one entry per person: the ID index (0-based, stack order) or None for
a person who carries no identity (their skeleton is still drawn, sec. 4.2 of the paper).

Order strings read like the picture, left to right over the people who have a face:
``"left_to_right"`` (default) gives the leftmost face ID 0, the next ID 1, ...; ``"right_to_left"``
mirrors it; an explicit list such as ``"2,0,1"`` gives the leftmost face ID 2, the middle one ID 0
and the rightmost ID 1, and ``-`` skips a person (``"1,-,0"``: the middle person gets no ID).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from .faceboxes import box_center, face_center_from_pose
from .keypoints import Person

NAMED_ORDERS = ("left_to_right", "right_to_left")
SKIP_TOKENS = ("-", "_", "x", "none")


class AssignmentError(ValueError):
    """IDs cannot be placed on the people of the pose; the message says both counts or the bad token."""


def _position(item: Person | np.ndarray | None) -> tuple[float, float] | None:
    """Horizontal sort key of a person: face centre (normalised units are fine, only order matters)."""
    if item is None:
        return None
    if isinstance(item, Person):
        return face_center_from_pose(item, (1, 1))
    arr = np.asarray(item, np.float32).reshape(-1)
    if arr.size != 4:
        raise ValueError(f"a face box must be (x0, y0, x1, y1), got {arr.size} numbers")
    return box_center(arr)


def parse_order(order: str, n_ids: int) -> list[int | None] | str:
    """An order string -> a named order, or the explicit list of IDs (None = skip) left to right."""
    text = (order or "").strip().lower()
    if text in ("", "default", "auto"):
        return "left_to_right"
    if text in NAMED_ORDERS:
        return text
    tokens = [t for t in re.split(r"[,\s;]+", text) if t]
    ids: list[int | None] = []
    for t in tokens:
        if t in SKIP_TOKENS:
            ids.append(None)
            continue
        if not t.isdigit():
            raise AssignmentError(
                f"order {order!r}: {t!r} is not an ID number or '-' (use e.g. '2,0,1', '1,-,0' or "
                f"one of {NAMED_ORDERS})"
            )
        ids.append(int(t))
    named = [i for i in ids if i is not None]
    bad = [i for i in named if i >= n_ids]
    if bad:
        raise AssignmentError(
            f"order {order!r} names ID {bad[0]}, but only {n_ids} identities are stacked (IDs 0..{n_ids - 1})"
        )
    dupes = sorted({i for i in named if named.count(i) > 1})
    if dupes:
        raise AssignmentError(f"order {order!r} names ID {dupes[0]} more than once; each ID goes to one person")
    missing = [i for i in range(n_ids) if i not in named]
    if missing:
        raise AssignmentError(
            f"order {order!r} leaves ID(s) {missing} without a person; name each of the {n_ids} IDs once"
        )
    return ids


def assign_ids(
    people: Sequence[Person | np.ndarray | None], n_ids: int, order: str = "left_to_right"
) -> list[int | None]:
    """Assign ``n_ids`` identities to people.

    ``people``: Person objects (placed by the face centre of their head keypoints) or pixel face
    boxes (x0, y0, x1, y1), None for a person without a face. Only people with a face can carry an
    ID. Returns one entry per input person: the ID or None.
    """
    if n_ids < 0:
        raise AssignmentError(f"the number of identities must be >= 0, got {n_ids}")
    if len(people) == 0:
        raise AssignmentError("the pose has no people; use a pose with at least one person")
    positions = [_position(p) for p in people]
    faced = [i for i, pos in enumerate(positions) if pos is not None]
    if n_ids > len(faced):
        without = len(people) - len(faced)
        extra = f" ({without} more without head keypoints)" if without else ""
        raise AssignmentError(
            f"{n_ids} identities but the pose has only {len(faced)} people with a visible face{extra}; "
            "use fewer identities or a pose with more people"
        )
    # Left to right by face centre x; y breaks ties so the result never depends on input order.
    faced.sort(key=lambda i: (positions[i][0], positions[i][1]))
    parsed = parse_order(order, n_ids)
    if parsed == "right_to_left":
        faced.reverse()
    if isinstance(parsed, str):
        ids: list[int | None] = list(range(n_ids)) + [None] * (len(faced) - n_ids)
    else:
        if len(parsed) > len(faced):
            raise AssignmentError(
                f"order {order!r} lists {len(parsed)} positions but the pose has only {len(faced)} "
                "people with a visible face"
            )
        ids = parsed + [None] * (len(faced) - len(parsed))
    out: list[int | None] = [None] * len(people)
    for person_index, id_ in zip(faced, ids):
        out[person_index] = id_
    return out


def people_for_ids(assignment: Sequence[int | None], n_ids: int) -> list[int]:
    """Inverse of an assignment: for each ID 0..n_ids-1, the index of its person."""
    where = {id_: i for i, id_ in enumerate(assignment) if id_ is not None}
    missing = [k for k in range(n_ids) if k not in where]
    if missing:
        raise AssignmentError(f"ID(s) {missing} have no person in the assignment {list(assignment)}")
    return [where[k] for k in range(n_ids)]
