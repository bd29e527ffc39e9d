"""Per-person prompts as token groups with their own masks: the layout, the masks, both kernels and
both modes against the independent float64 reference (tests/attention_reference.py), isolation of a
person's prompt to its region, gradients, caching, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_reference import reference_attention, reference_attention_torch
from instantfamily_nodes.attention import IDMasks, TokenLayout, masked_attention

MODE_KERNELS = [("hard", "dense"), ("hard", "regional"), ("paper", "dense"), ("paper", "regional")]


def rects(n, H, W, rng, soft=False, min_frac=0.0):
    m = np.zeros((n, H, W), dtype=np.float32)
    for i in range(n):
        y0, x0 = rng.integers(0, max(1, int(H * (1 - min_frac)))), rng.integers(0, max(1, int(W * (1 - min_frac))))
        y1, x1 = rng.integers(y0 + 1, H + 1), rng.integers(x0 + 1, W + 1)
        m[i, y0:y1, x0:x1] = rng.uniform(0.2, 1.0) if soft else 1.0
    return m


def qkv(b, grid, layout, heads, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads * d, generator=g).to(dtype)
            for n in (grid[0] * grid[1], layout.total, layout.total)]


# --- layout -------------------------------------------------------------------------------------

def test_layout_puts_person_prompts_after_all_id_blocks():
    layout = TokenLayout(77, 2, 50, prompt_lens=(77, 0, 154))
    # Hand-computed: 77 text, IDs at 77..127 and 127..177, prompts from 177: person 0 77 tokens,
    # person 1 none, person 2 (no identity: 3 persons, 2 IDs) 154 tokens.
    assert layout.total == 77 + 100 + 231
    assert layout.ids_slice == slice(77, 177)
    assert layout.prompt_slice(0) == slice(177, 254)
    assert layout.prompt_slice(1) == slice(254, 254)
    assert layout.prompt_slice(2) == slice(254, 408)
    assert [(g.kind, g.index, g.tokens) for g in layout.groups] == [
        ("id", 0, slice(77, 127)), ("id", 1, slice(127, 177)),
        ("prompt", 0, slice(177, 254)), ("prompt", 2, slice(254, 408))]
    owner = layout.owner
    assert owner.shape == (408,) and (owner[:77] == -1).all()
    assert (owner[177:254] == 0).all() and (owner[254:] == 2).all()
    assert "person prompts [77, 0, 154]" in layout.describe()
    assert layout.has_prompts and not TokenLayout(77, 2, 50, prompt_lens=(0, 0)).has_prompts


def test_layout_hashes_prompt_lens_and_rejects_bad_ones():
    assert TokenLayout(77, 1, 5, prompt_lens=[77]) == TokenLayout(77, 1, 5, prompt_lens=(77,))
    assert len({TokenLayout(77, 1, 5, prompt_lens=(77,)), TokenLayout(77, 1, 5)}) == 2
    with pytest.raises(ValueError, match="prompt_lens must be a sequence of non-negative ints"):
        TokenLayout(77, 1, 5, prompt_lens=(77, -1))
    with pytest.raises(IndexError, match="person 2 out of range"):
        TokenLayout(77, 1, 5, prompt_lens=(77, 77)).prompt_slice(2)
    # Prompts only, no identities at all: a regional prompt.
    assert TokenLayout(77, 0, 0, prompt_lens=(77,)).total == 154


# --- against the float64 reference ---------------------------------------------------------------

CASES = [
    # n_ids, prompt_lens, grid, image, heads, d
    (2, (7, 9), (8, 8), (64, 64), 2, 8),                   # each ID with its prompt
    (2, (7, 0, 11), (9, 13), (72, 104), 4, 4),             # ID 1 without a prompt, person 2 without an ID
    (0, (6, 6), (5, 7), (33, 50), 2, 4),                   # prompts only, no identities
    (3, (0, 0, 0), (6, 6), (48, 48), 2, 4),                # prompt slots, all empty: the IDs alone
    (1, (154,), (4, 4), (32, 32), 2, 4),                   # a long (2 x 77) person prompt
]


@pytest.mark.parametrize("mode,kernel", MODE_KERNELS)
@pytest.mark.parametrize("n_ids,prompt_lens,grid,image,heads,d", CASES)
def test_matches_float64_reference(mode, kernel, n_ids, prompt_lens, grid, image, heads, d):
    rng = np.random.default_rng(len(prompt_lens) * 10 + n_ids)
    layout = TokenLayout(77, n_ids, 5, prompt_lens=prompt_lens)
    faces = rects(n_ids, *image, rng, soft=True)
    regions = rects(len(prompt_lens), *image, rng, soft=True)
    strength = rng.uniform(0.0, 2.5, n_ids).astype(np.float32)
    region_strength = rng.uniform(0.3, 2.0, len(prompt_lens)).astype(np.float32)
    masks = IDMasks(torch.from_numpy(faces) if n_ids else None, strength if n_ids else None,
                    torch.from_numpy(regions), region_strength)
    q, k, v = qkv(2, grid, layout, heads, d, seed=n_ids)
    out = masked_attention(q, k, v, heads, layout, masks, grid, mode, kernel)
    ref, _ = reference_attention(q, k, v, heads, 77, 5, faces, grid, mode, strength, prompt_lens, regions,
                                 region_strength)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["hard", "paper"])
def test_per_sample_regions_match_reference(mode):
    """Training-style batches: per-sample face masks and regions run the dense kernel."""
    rng = np.random.default_rng(7)
    layout = TokenLayout(77, 2, 5, prompt_lens=(6, 8))
    faces = np.stack([rects(2, 40, 40, rng) for _ in range(3)])
    regions = np.stack([rects(2, 40, 40, rng, soft=True) for _ in range(3)])
    q, k, v = qkv(3, (5, 5), layout, 2, 4, seed=3)
    masks = IDMasks(torch.from_numpy(faces), None, torch.from_numpy(regions))
    out = masked_attention(q, k, v, 2, layout, masks, (5, 5), mode)
    ref, _ = reference_attention(q, k, v, 2, 77, 5, faces, (5, 5), mode, None, (6, 8), regions)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-4)


# --- isolation and neutrality -----------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["dense", "regional"])
def test_hard_mode_person_prompt_gets_no_attention_outside_its_region(kernel):
    """Values of person 1's prompt set huge: pixels outside region 1 must not change at all; inside
    they change. The faces and the other prompt stay as they are."""
    layout = TokenLayout(77, 2, 5, prompt_lens=(10, 12))
    H = W = 64
    faces = np.zeros((2, H, W), np.float32)
    faces[0, 8:24, 8:24] = 1
    faces[1, 8:24, 40:56] = 1
    regions = np.zeros((2, H, W), np.float32)
    regions[0, :, :32] = 1
    regions[1, :, 32:] = 1
    masks = IDMasks(torch.from_numpy(faces), None, torch.from_numpy(regions))
    q, k, v = qkv(2, (8, 8), layout, 2, 8, seed=1)
    base = masked_attention(q, k, v, 2, layout, masks, (8, 8), "hard", kernel)
    k2, v2 = k.clone(), v.clone()
    k2[:, layout.prompt_slice(1)] += 5 * torch.randn_like(k2[:, layout.prompt_slice(1)])
    v2[:, layout.prompt_slice(1)] += 100.0
    moved = masked_attention(q, k2, v2, 2, layout, masks, (8, 8), "hard", kernel)
    outside = torch.zeros(8, 8, dtype=torch.bool)
    outside[:, :4] = True
    outside = outside.flatten()
    assert torch.equal(moved[:, outside], base[:, outside])
    assert (moved[:, ~outside] - base[:, ~outside]).abs().amin() > 1e-3


@pytest.mark.parametrize("mode,kernel", MODE_KERNELS)
def test_ids_off_equals_identities_at_strength_zero(mode, kernel):
    """Outside the IDs' sigma window the layer keeps the person prompts and switches the IDs off."""
    rng = np.random.default_rng(2)
    layout = TokenLayout(77, 2, 5, prompt_lens=(6, 0, 9))
    faces, regions = rects(2, 32, 32, rng), rects(3, 32, 32, rng, soft=True)
    masks = IDMasks(torch.from_numpy(faces), [1.0, 2.0], torch.from_numpy(regions))
    q, k, v = qkv(1, (4, 4), layout, 2, 4, seed=5)
    out = masked_attention(q, k, v, 2, layout, masks.ids_off(), (4, 4), mode, kernel)
    ref, _ = reference_attention(q, k, v, 2, 77, 5, faces, (4, 4), mode, [0.0, 0.0], (6, 0, 9), regions)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-4)
    assert masks.ids_off() is masks.ids_off()


def test_regions_everywhere_at_strength_one_is_plain_attention_bit_for_bit():
    layout = TokenLayout(77, 1, 5, prompt_lens=(9,))
    masks = IDMasks(torch.ones(1, 16, 16), None, torch.ones(1, 16, 16))
    assert masks.trivial
    q, k, v = qkv(2, (4, 4), layout, 2, 4)
    out = masked_attention(q, k, v, 2, layout, masks, (4, 4))
    plain = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(2, -1, 2, 4).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 16, 8)
    assert torch.equal(out, plain)


# --- training ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,kernel", MODE_KERNELS)
def test_gradcheck_with_prompt_groups(mode, kernel):
    layout = TokenLayout(3, 1, 2, prompt_lens=(2, 3))
    rng = np.random.default_rng(4)
    faces, regions = rects(1, 6, 8, rng, soft=True), rects(2, 6, 8, rng, soft=True)
    masks = IDMasks(torch.from_numpy(faces), None, torch.from_numpy(regions), [1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, generator=g, dtype=torch.float64).requires_grad_()
               for n in (12, layout.total, layout.total))
    fn = lambda q, k, v: masked_attention(q, k, v, 2, layout, masks, (3, 4), mode, kernel)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)
    out = fn(q, k, v)
    ref = reference_attention_torch(q, k, v, 2, 3, 2, faces, (3, 4), mode, None, (2, 3), regions, [1.0, 0.5])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)


# --- caching and errors ------------------------------------------------------------------------------

def test_terms_are_cached_per_layout_and_grid():
    layout = TokenLayout(77, 2, 5, prompt_lens=(7, 7))
    rng = np.random.default_rng(0)
    masks = IDMasks(torch.from_numpy(rects(2, 64, 64, rng)), None, torch.from_numpy(rects(2, 64, 64, rng)))
    bias = masks.hard_bias(layout, 8, 8, torch.float32, "cpu")
    regions = masks.regions_for(layout, 8, 8, "cpu")
    assert masks.hard_bias(layout, 8, 8, torch.float32, "cpu") is bias
    assert masks.regions_for(layout, 8, 8, "cpu") is regions
    assert masks.paper_regions(layout, 8, 8, "cpu") is masks.paper_regions(layout, 8, 8, "cpu")
    assert bias.shape == (1, 1, 64, layout.total)
    # One part per visible group: 2 IDs + 2 prompts.
    assert [r[0] for r in regions] == [g.tokens for g in layout.groups]


def test_errors_name_the_input():
    layout = TokenLayout(77, 1, 5, prompt_lens=(7, 7))
    face = torch.ones(1, 8, 8)
    with pytest.raises(ValueError, match="1 person regions given for a context with 2 person prompts"):
        IDMasks(face, None, torch.ones(1, 8, 8)).check_layout(layout)
    empty = torch.ones(2, 8, 8)
    empty[1] = 0
    with pytest.raises(ValueError, match=r"person region\(s\) \[1\] are empty"):
        IDMasks(face, None, empty).check_layout(layout)
    # An empty region is fine for a person without a prompt.
    IDMasks(face, None, empty).check_layout(TokenLayout(77, 1, 5, prompt_lens=(7, 0)))
    with pytest.raises(ValueError, match="region_strength must give one value per person region"):
        IDMasks(face, None, torch.ones(2, 8, 8), [1.0])
    with pytest.raises(ValueError, match="regions: mask values must be finite and in"):
        IDMasks(face, None, torch.full((2, 8, 8), 2.0))
    with pytest.raises(ValueError, match="different batch sizes"):
        IDMasks(torch.ones(2, 1, 8, 8), None, torch.ones(3, 2, 8, 8))
    with pytest.raises(ValueError, match="needs face masks, person regions, or both"):
        IDMasks(None)


def test_stack_context_appends_person_prompts_after_the_ids():
    from instantfamily_nodes.models import stack_context

    text, ids = torch.randn(2, 77, 8), torch.randn(2, 5, 8)
    p0, p2 = torch.randn(77, 8), torch.randn(1, 154, 8)
    ctx, layout = stack_context(text, ids, [p0, None, p2])
    assert layout == TokenLayout(77, 2, 5, prompt_lens=(77, 0, 154))
    assert torch.equal(ctx[:, :77], text) and torch.equal(ctx[1, layout.id_slice(1)], ids[1])
    assert torch.equal(ctx[0, layout.prompt_slice(0)], p0) and torch.equal(ctx[1, layout.prompt_slice(2)], p2[0])
    with pytest.raises(ValueError, match="person prompt 1: expected"):
        stack_context(text, ids, [p0, torch.randn(77, 4)])


@pytest.mark.parametrize("max_classes", [64, 0])
def test_hard_regional_pixel_classes_and_the_merging_fallback(monkeypatch, max_classes):
    """The hard regional kernel runs one attention per pixel class (pixels that see the same token
    groups); with more classes than MAX_PIXEL_CLASSES it merges per-group parts instead. Both exact."""
    from instantfamily_nodes.attention import masked as masked_module

    monkeypatch.setattr(masked_module, "MAX_PIXEL_CLASSES", max_classes)
    rng = np.random.default_rng(11)
    layout = TokenLayout(77, 3, 5, prompt_lens=(6, 0, 9, 4))
    faces, regions = rects(3, 48, 48, rng, soft=True), rects(4, 48, 48, rng, soft=True)
    masks = IDMasks(torch.from_numpy(faces), [1.0, 0.5, 2.0], torch.from_numpy(regions), [1.0, 1.0, 0.7, 1.0])
    q, k, v = qkv(2, (6, 6), layout, 2, 4, seed=9)
    out = masked_attention(q, k, v, 2, layout, masks, (6, 6), "hard", "regional")
    ref, _ = reference_attention(q, k, v, 2, 77, 5, faces, (6, 6), "hard", [1.0, 0.5, 2.0], (6, 0, 9, 4), regions,
                                 [1.0, 1.0, 0.7, 1.0])
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-4)
    classes = masks.pixel_classes(layout, 6, 6, "cpu", torch.float32, max_classes)
    if max_classes:
        # Every pixel in exactly one class, and each class sees the text first.
        assert sorted(torch.cat([c[0] for c in classes]).tolist()) == list(range(36))
        assert all(torch.equal(c[1][:77], torch.arange(77)) for c in classes)
    else:
        assert classes is None


def test_content_lengths_and_trim_by_hand():
    from instantfamily_nodes.pose.persons import END_TOKEN, content_lengths, trim_encoding

    start = 49406
    short = [(start, 1.0), (320, 1.0), (736, 1.0), (END_TOKEN, 1.0)] + [(END_TOKEN, 1.0)] * 73
    full = [(start, 1.0)] + [(1000 + i, 1.0) for i in range(75)] + [(END_TOKEN, 1.0)]
    blank = [(start, 1.0)] + [(END_TOKEN, 1.0)] * 76
    assert content_lengths([short]) == [4]
    assert content_lengths([full, short]) == [77, 4]
    assert content_lengths([blank]) == [2]
    enc = torch.arange(2 * 77, dtype=torch.float32).view(1, 154, 1)
    got = trim_encoding(enc, [77, 4])
    assert got.flatten().tolist() == list(range(77)) + [77, 78, 79, 80]
    with pytest.raises(ValueError, match="expected 77 x 1 chunks"):
        trim_encoding(enc, [4])
