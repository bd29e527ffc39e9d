"""Face encoding on real photos with the offline dlib backend, plus inputs, ordering and bad inputs.

Photos come from installed packages: insightface's t1.jpg (a group of six), scikit-image's astronaut
(Eileen Collins) and coffee (no face), matplotlib's grace_hopper.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

dlib = pytest.importorskip("dlib", reason="the dlib backend needs dlib-bin")
pytest.importorskip("insightface", reason="alignment uses insightface.utils.face_align")
Image = pytest.importorskip("PIL.Image", reason="Pillow reads the test photos")

from instantfamily_nodes.models.faces import Faces  # noqa: E402
from instantfamily_nodes.models.faces.dlib_backend import DlibEncoder  # noqa: E402
from instantfamily_nodes.models.faces.encode import cosine_similarity, encode_faces, require_local  # noqa: E402
from instantfamily_nodes.models.faces.errors import NoFaceError, NoLocalFeaturesError  # noqa: E402
from instantfamily_nodes.models.faces.image import as_image_list, to_rgb_uint8  # noqa: E402
from instantfamily_nodes.models.faces.ordering import order_faces, parse_faces_per_image  # noqa: E402
from instantfamily_nodes.models.faces.preview import draw_faces  # noqa: E402
from instantfamily_nodes.palette import id_color  # noqa: E402


def _photo(path: Path) -> np.ndarray:
    if not path.is_file():
        pytest.skip(f"test photo {path} is not installed")
    return np.asarray(Image.open(path).convert("RGB"))


def _site(pkg: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(pkg)
    if spec is None:
        pytest.skip(f"{pkg} is not installed; it ships a test photo")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def enc() -> DlibEncoder:
    return DlibEncoder()


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return _photo(_site("insightface") / "data" / "images" / "t1.jpg")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _photo(_site("skimage") / "data" / "astronaut.png")


@pytest.fixture(scope="module")
def grace() -> np.ndarray:
    import matplotlib

    return _photo(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def group_faces(enc, group) -> Faces:
    return encode_faces(enc, group)


def _best_match(f, faces: Faces) -> int:
    return int(np.argmax([cosine_similarity(f.embedding, g.embedding) for g in faces]))


def test_group_photo_all_faces_left_to_right(group_faces, group):
    # t1.jpg shows six people; one image -> 'auto' takes every face
    assert len(group_faces) == 6
    xs = [f.center[0] for f in group_faces]
    assert xs == sorted(xs) and len(set(xs)) == 6
    assert all(f.image_index == 0 and f.image_size == group.shape[:2] for f in group_faces)
    assert all(f.local is None for f in group_faces) and not group_faces.has_local
    for f in group_faces:
        assert f.crop.shape == (112, 112, 3) and f.crop.dtype == np.uint8
        assert f.embedding.shape == (128,) and abs(np.linalg.norm(f.embedding) - 1) < 1e-5
        # eyes above mouth, left eye left of right eye: the 5 points are in insightface's order
        (lx, ly), (rx, ry), _, (mlx, mly), (mrx, mry) = f.kps
        assert lx < rx and mlx < mrx and max(ly, ry) < min(mly, mry)
        x0, y0, x1, y1 = f.box
        assert x0 <= f.kps[2][0] <= x1 and y0 <= f.kps[2][1] <= y1


def test_group_order_is_stable_under_flip_and_crop(enc, group, group_faces):
    # Mirrored photo: same people, reverse order. ID k of the flip must be person 5-k of the original.
    flipped = encode_faces(enc, group[:, ::-1].copy())
    assert [_best_match(f, group_faces) for f in flipped] == [5, 4, 3, 2, 1, 0]
    # Cropping a border and brightening keeps everyone and their order.
    h, w = group.shape[:2]
    cropped = np.clip(group[20 : h - 10, 30 : w - 15].astype(np.float32) * 1.2, 0, 255).astype(np.uint8)
    again = encode_faces(enc, cropped)
    assert [_best_match(f, group_faces) for f in again] == list(range(6))


def test_same_person_is_closer_than_different_people(enc, astronaut, grace, group_faces):
    people = {"astronaut": astronaut, "grace": grace}
    ref = {k: encode_faces(enc, v)[0] for k, v in people.items()}
    # the group's six plus the other reference are all different people
    for name, img in people.items():
        h, w = img.shape[:2]
        variants = {
            "flip": img[:, ::-1].copy(),
            "crop": img[h // 10 :, w // 12 : w - w // 12].copy(),
            "bright": np.clip(img.astype(np.float32) * 1.4 + 10, 0, 255).astype(np.uint8),
            "dark": (img.astype(np.float32) * 0.6).astype(np.uint8),
        }
        others = [ref[k] for k in people if k != name] + list(group_faces)
        worst_other = max(cosine_similarity(ref[name].embedding, o.embedding) for o in others)
        for vname, v in variants.items():
            f = encode_faces(enc, v, faces_per_image="1")[0]
            same = cosine_similarity(ref[name].embedding, f.embedding)
            assert same > worst_other + 0.02, f"{name}/{vname}: same {same:.3f} vs other {worst_other:.3f}"
    # and within the group photo no two people look alike to the encoder as much as a person to itself
    sims = [cosine_similarity(a.embedding, b.embedding) for i, a in enumerate(group_faces)
            for b in list(group_faces)[i + 1 :]]
    assert max(sims) < 0.97


def test_one_photo_per_person_and_mixed_inputs(enc, astronaut, group, grace):
    several = encode_faces(enc, [astronaut, grace])   # 'auto' with 2 images: largest face each
    assert [f.image_index for f in several] == [0, 1]
    mixed = encode_faces(enc, [astronaut, group, grace], faces_per_image="1, all, 1")
    assert [f.image_index for f in mixed] == [0] + [1] * 6 + [2]
    assert cosine_similarity(mixed[0].embedding, several[0].embedding) > 0.999
    assert cosine_similarity(mixed[7].embedding, several[1].embedding) > 0.999
    two = encode_faces(enc, group, faces_per_image="2")   # two prominent faces of the group, in order
    assert len(two) == 2 and two[0].center[0] < two[1].center[0]
    assert min(f.area for f in two) >= 0.5 * max(f.area for f in encode_faces(enc, group))


def test_largest_face_wins_over_a_weak_false_hit(enc, astronaut):
    # Cropped this way, dlib's HOG reports a weak false face (score ~0.01) as large as the real one
    # lower in the image; "one face per photo" must still pick the astronaut.
    h, w = astronaut.shape[:2]
    crop = astronaut[h // 10 :, w // 12 : w - w // 12].copy()
    dets = enc.detect(crop, 0)
    assert len(dets) == 2, "precondition: the false hit is there"
    f = encode_faces(enc, crop, faces_per_image="1")[0]
    assert f.box[3] < h // 2  # the astronaut's face, in the upper half


def test_size_and_index_list_orders(enc, group, group_faces):
    by_size = encode_faces(enc, group, order="size")
    assert [f.area for f in by_size] == sorted((f.area for f in group_faces), reverse=True)
    picked = encode_faces(enc, group, order="index_list", index_list="4, 0, 2")
    for f, i in zip(picked, (4, 0, 2)):
        np.testing.assert_array_equal(f.box, group_faces[i].box)
    assert len(picked) == 3
    with pytest.raises(ValueError, match=r"\[6\] out of range; 6 faces"):
        order_faces(list(group_faces), "index_list", "0, 6")
    with pytest.raises(ValueError, match="repeats"):
        order_faces(list(group_faces), "index_list", "1, 1")


def test_gray_rgba_float_and_batches(enc, grace, astronaut):
    color = encode_faces(enc, grace)[0]
    gray = np.asarray(Image.fromarray(grace).convert("L"))
    assert gray.ndim == 2
    g = encode_faces(enc, gray)[0]
    assert cosine_similarity(color.embedding, g.embedding) > 0.95
    rgba = np.concatenate([grace, np.full(grace.shape[:2] + (1,), 255, np.uint8)], 2)
    np.testing.assert_allclose(encode_faces(enc, rgba)[0].embedding, color.embedding, atol=1e-6)
    # a ComfyUI-like float batch B x H x W x C of two photos of the same size
    batch = np.stack([astronaut, astronaut[:, ::-1]]).astype(np.float32) / 255.0
    faces = encode_faces(enc, batch)
    assert [f.image_index for f in faces] == [0, 1]
    assert cosine_similarity(faces[0].embedding, faces[1].embedding) > 0.95


def test_image_conversion_rules():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255
    out = to_rgb_uint8(rgba)
    assert out[0, 0].tolist() == [200, 0, 0]          # opaque pixel kept
    assert out[1, 1].tolist() == [255, 255, 255]      # transparent -> white background
    assert to_rgb_uint8(np.full((2, 2), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="got 2"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_uint8(np.full((4, 4, 3), np.nan, np.float32))
    assert len(as_image_list([np.zeros((2, 5, 5, 3)), np.zeros((7, 7))])) == 3
    with pytest.raises(ValueError, match="no images"):
        as_image_list([])


def test_faces_per_image_parsing():
    assert parse_faces_per_image("auto", 1) == [None]
    assert parse_faces_per_image("auto", 3) == [1, 1, 1]
    assert parse_faces_per_image("all", 2) == [None, None]
    assert parse_faces_per_image("1, all", 2) == [1, None]
    with pytest.raises(ValueError, match="3 values for 2 images"):
        parse_faces_per_image("1,1,1", 2)
    with pytest.raises(ValueError, match="value 2 is 'two'"):
        parse_faces_per_image("1, two", 2)


def test_no_face_errors_name_the_image(enc, astronaut):
    import skimage.data

    coffee = skimage.data.coffee()
    with pytest.raises(NoFaceError, match=r"image 2 of 2: no face found after dlib upsample 0, 1 and a padded retry") as e:
        encode_faces(enc, [astronaut, coffee])
    assert e.value.image_index == 1
    with pytest.raises(NoFaceError, match=r"image 1 of 1: .*one flat colour \(all pixels 0\)"):
        encode_faces(enc, np.zeros((256, 256, 3), np.uint8))
    with pytest.raises(NoFaceError, match=r"image 1 of 1 is only 16x16 px"):
        encode_faces(enc, np.full((16, 16, 3), 128, np.uint8))
    with pytest.raises(NoFaceError, match=r"image 1 of 1: asked for 2 faces, found 1"):
        encode_faces(enc, astronaut, faces_per_image="2")


def test_padded_retry_finds_a_face_that_fills_the_frame(enc, grace):
    # Cropped inside the face box, the face fills the frame: HOG's window misses it at every upsampling,
    # the padded retry finds it, and its keypoints come back in the crop's coordinates.
    f = encode_faces(enc, grace)[0]
    x0, y0, x1, y1 = (int(v) for v in f.box)
    m = 40
    tight = grace[y0 + m : y1 - m, x0 + m : x1 - m].copy()
    for rung in enc.ladder:
        assert enc.detect(tight, rung) == [], "precondition: the plain ladder misses this crop"
    got = encode_faces(enc, tight)[0]
    np.testing.assert_allclose(got.kps, f.kps - [x0 + m, y0 + m], atol=8)
    h, w = tight.shape[:2]
    assert 0 <= got.box[0] < got.box[2] <= w and 0 <= got.box[1] < got.box[3] <= h


def test_dlib_faces_have_no_local_features_and_say_so(group_faces):
    from instantfamily_nodes.models.id_stack import project_faces
    from instantfamily_nodes.models.projection import IDProjection, ProjectionConfig

    with pytest.raises(NoLocalFeaturesError, match=r"projection.*'dlib'.*insightface backend"):
        require_local(group_faces, "The ID projection")
    # Issue 9, defect 6: the live path (Project IDs) raises the documented error too, naming the IDs.
    projection = IDProjection(ProjectionConfig(d_gf=128, d_lf=8, side=2, d_k=16))
    with pytest.raises(NoLocalFeaturesError, match=r"ID\(s\) \[0, 1, 2, 3, 4, 5\] have no local feature map.*'dlib'"):
        project_faces(group_faces, projection, "dlib")


def test_preview_boxes_each_face_in_its_id_colour(group, group_faces):
    (preview,) = draw_faces([group], group_faces)
    assert preview.shape == group.shape and preview.dtype == np.uint8
    for n, f in enumerate(group_faces):
        x0, y0, x1, y1 = (int(round(v)) for v in f.box)
        ym = (y0 + y1) // 2
        # the left and right box edges at mid-height are drawn in ID n's colour
        assert tuple(preview[ym, x0]) == id_color(n)
        assert tuple(preview[ym, x1 - 1]) == id_color(n) or tuple(preview[ym, x1]) == id_color(n)
    untouched = np.ones(group.shape[:2], bool)
    for f in group_faces:
        x0, y0, x1, y1 = (int(round(v)) for v in f.box)
        untouched[max(y0 - 60, 0) : y1 + 10, max(x0 - 10, 0) : x1 + 10] = False
    np.testing.assert_array_equal(preview[untouched], group[untouched])


def test_merge_faces_keeps_order_and_renumbers_images():
    from instantfamily_nodes.models.faces import Face, Faces, merge_faces

    def face(x, image):
        return Face(box=np.array([x, 0, x + 10, 10], np.float32), kps=np.zeros((5, 2), np.float32),
                    embedding=np.ones(4, np.float32) / 2, local=None, crop=np.zeros((112, 112, 3), np.uint8),
                    score=1.0, image_index=image, image_size=(20, 20))

    a = Faces([face(0, 0), face(20, 1)], encoder="dlib")
    b = Faces([face(5, 0), face(7, 0), face(9, 2)], encoder="dlib")
    m = merge_faces([a, b])
    assert [f.box[0] for f in m] == [0, 20, 5, 7, 9]
    assert [f.image_index for f in m] == [0, 1, 2, 2, 4]   # b's images follow a's two images
    assert m.encoder == "dlib" and [f.image_index for f in b] == [0, 0, 2]   # inputs untouched
    with pytest.raises(ValueError, match="different encoders"):
        merge_faces([a, Faces([face(0, 0)], encoder="insightface/antelopev2")])


@pytest.mark.parametrize("who, m", [("grace", 40), ("astronaut", 10)])
def test_padded_retry_embeds_the_face_where_it_was_found(enc, who, m, grace, astronaut):
    # Issue 9, defect 1: the padded retry shifted the box and keypoints back but not the 68 landmarks
    # the dlib descriptor is computed from, so the embedding came from misplaced landmarks (cosine to
    # the same face fell to the different-people range). Reference: the face detected and embedded
    # directly in the padded image, where no retry is needed.
    photo = {"grace": grace, "astronaut": astronaut}[who]
    f = encode_faces(enc, photo, faces_per_image="1")[0]
    x0, y0, x1, y1 = (int(v) for v in f.box)
    tight = photo[y0 + m : y1 - m, x0 + m : x1 - m].copy()
    assert all(enc.detect(tight, rung) == [] for rung in enc.ladder), "precondition: only the padded retry finds it"
    got = encode_faces(enc, tight)[0]
    h, w = tight.shape[:2]
    py, px = round(h * 0.25), round(w * 0.25)
    padded = np.pad(tight, ((py, py), (px, px), (0, 0)))
    dets = enc.detect(padded, enc.ladder[0])
    assert len(dets) == 1
    (ref,) = enc.encode(padded, dets)
    assert cosine_similarity(got.embedding, ref.embedding) >= 0.99
    assert cosine_similarity(got.embedding, f.embedding) >= 0.94   # the full photo: same person
    np.testing.assert_allclose(got.kps, dets[0].kps - [px, py], atol=1e-4)
