"""pose.persons: person body boxes and regions by hand, the prompt order, prompt lines, the preview."""
from __future__ import annotations

import numpy as np
import pytest

from instantfamily_nodes.palette import id_color
from instantfamily_nodes.pose import faceboxes, persons
from instantfamily_nodes.pose.keypoints import Person, PoseFrame, person_from_points

NECK, R_HIP, L_ANKLE, NOSE, R_EYE, L_EYE = 1, 8, 13, 0, 14, 15


def body(points: dict[int, tuple[float, float]]) -> Person:
    return person_from_points([points.get(i) for i in range(18)])


def headed(x: float) -> Person:
    """A standing person whose face is at x (normalised)."""
    return body({NOSE: (x, 0.2), R_EYE: (x - 0.02, 0.18), L_EYE: (x + 0.02, 0.18), NECK: (x, 0.3),
                 R_HIP: (x - 0.03, 0.6), L_ANKLE: (x + 0.03, 0.9)})


def test_body_box_and_region_by_hand():
    # No head joint, so the box is the keypoints' own: on a 200 x 100 (W x H) canvas,
    # x 0.4..0.6 -> 80..120 px, y 0.3..0.9 -> 30..90 px.
    p = body({NECK: (0.5, 0.3), R_HIP: (0.4, 0.7), L_ANKLE: (0.6, 0.9)})
    np.testing.assert_allclose(persons.body_box(p, (100, 200)), [80, 30, 120, 90], atol=1e-4)
    # margin 0.2 in total: 40 x 60 grows by 4 px left/right and 6 px top/bottom -> [76, 24, 124, 96):
    # columns 76..123 and rows 24..95 (pixel-centre rule).
    m = persons.person_regions(PoseFrame([p], (100, 200)), (100, 200), 0, margin=0.2)
    assert m.shape == (1, 100, 200)
    cols, rows = np.nonzero(m[0].any(0))[0], np.nonzero(m[0].any(1))[0]
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (76, 123, 24, 95)
    assert m[0, 24:96, 76:124].all() and m.sum() == 48 * 72


def test_body_box_covers_the_head_and_the_hands():
    p = headed(0.5)
    face = faceboxes.face_box_from_pose(p, (512, 512))
    box = persons.body_box(p, (512, 512))
    assert box[0] <= face[0] and box[1] <= face[1] and box[2] >= face[2] and box[3] >= face[3]
    assert box[1] < 0.18 * 512                      # above the eyes: the head's top
    hand = np.zeros((21, 3), np.float32)
    hand[0] = (0.9, 0.5, 1.0)
    p.hand_right = hand
    assert persons.body_box(p, (512, 512))[2] == pytest.approx(0.9 * 512)
    assert persons.body_box(body({}), (512, 512)) is None


def test_prompt_order_ids_first_then_the_rest_left_to_right():
    a, b, c = headed(0.3), headed(0.55), headed(0.8)
    headless = body({NECK: (0.1, 0.3), R_HIP: (0.1, 0.6)})   # no face: can carry no ID
    people = [c, headless, a, b]
    # Faces left to right: a, b, c; "1,0": a gets ID 1, b gets ID 0, c none.
    assert persons.prompt_order(people, 2, "1,0") == [3, 2, 1, 0]    # b (ID 0), a (ID 1), headless, c
    assert persons.prompt_order(people, 2) == [2, 3, 1, 0]
    assert persons.prompt_order(people, 0) == [1, 2, 3, 0]           # no IDs: all left to right
    frame = PoseFrame(people, (256, 512))
    regions = persons.person_regions(frame, (256, 512), 2, "1,0")
    assert regions.shape == (4, 256, 512)
    for slot, person in enumerate([b, a, headless, c]):
        x0, _, x1, _ = persons.body_box(person, (256, 512))
        cols = np.nonzero(regions[slot].any(0))[0] + 0.5          # pixel centres
        assert cols.min() < x0 + 1 and cols.max() >= x1 - 1          # the region holds the body box
    with pytest.raises(ValueError, match="the pose has no people"):
        persons.person_regions(PoseFrame([], (64, 64)), (64, 64), 0)


def test_prompt_lines_and_first_words():
    assert persons.prompt_lines("red jacket\n\n  blue hat  \n\n") == ["red jacket", "", "blue hat"]
    assert persons.prompt_lines("") == []
    assert persons.first_words("a man in a red jacket", 4) == "a man in a ..."
    assert persons.first_words("a man in a red jacket") == "a man in a red ..."
    assert persons.first_words("smiling", 4) == "smiling"


def test_preview_outlines_each_region_in_its_id_colour():
    regions = np.zeros((3, 120, 240), np.float32)
    regions[0, 10:110, 5:100] = 1
    regions[1, 10:110, 120:235] = 1
    regions[2, 60:110, 40:200] = 1
    img = persons.prompt_preview(regions, ["a man in a red jacket", "", "holding a balloon"])
    assert img.shape == (120, 240, 3) and img.dtype == np.uint8
    # Region outlines: the left edge column of each region is drawn in its colour (below the label).
    assert tuple(img[100, 5]) == id_color(0)
    assert tuple(img[100, 120]) == id_color(1)
    # Labels are written in the person's colour inside the region's top-left corner.
    label = img[12:30, 6:90].reshape(-1, 3).astype(int)
    assert (np.abs(label - id_color(0)).sum(-1) < 30).sum() > 10
