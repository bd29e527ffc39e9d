"""TokenLayout: the single source of truth for slicing a context."""
from __future__ import annotations

import pytest
import torch

from instantfamily_nodes.attention import TokenLayout


@pytest.mark.parametrize("text_len", [77, 154, 231])
@pytest.mark.parametrize("n_ids", [0, 1, 4, 7, 16])
def test_slices_cover_the_context_in_order(text_len, n_ids):
    layout = TokenLayout.for_face_grid(text_len, n_ids, side=7)
    assert layout.tokens_per_id == 50
    assert layout.total == text_len + 50 * n_ids
    # Hand-computed offsets: ID n starts after the text and n whole ID blocks.
    for n in range(n_ids):
        assert layout.id_slice(n) == slice(text_len + 50 * n, text_len + 50 * (n + 1))
    owner = layout.owner
    assert owner.shape == (layout.total,)
    assert (owner[:text_len] == -1).all()
    for n in range(n_ids):
        assert (owner[layout.id_slice(n)] == n).all()


def test_extra_tokens_per_id_stay_inside_the_id_block():
    layout = TokenLayout(77, 3, 50, extra_per_id=4)
    assert layout.id_width == 54 and layout.total == 77 + 3 * 54
    assert layout.id_slice(2) == slice(77 + 108, 77 + 162)
    assert (layout.owner[77 + 54:77 + 108] == 1).all()


def test_split_round_trips():
    layout = TokenLayout(154, 3, 10)
    ctx = torch.arange(layout.total, dtype=torch.float32)[None, :, None].expand(2, -1, 4)
    text, ids = layout.split(ctx)
    assert text.shape == (2, 154, 4) and len(ids) == 3
    assert torch.equal(torch.cat([text, *ids], dim=1), ctx)
    assert ids[1][0, 0, 0] == 164


def test_hashable_and_equal_by_value():
    assert TokenLayout(77, 2, 50) == TokenLayout(77, 2, 50)
    assert len({TokenLayout(77, 2, 50), TokenLayout(77, 2, 50), TokenLayout(154, 2, 50)}) == 2


def test_errors():
    with pytest.raises(ValueError, match="text_len must be >= 1"):
        TokenLayout(0, 1, 50)
    with pytest.raises(ValueError, match="n_ids must be a non-negative int"):
        TokenLayout(77, -1, 50)
    with pytest.raises(IndexError, match="identity 2 out of range for a layout with 2 IDs"):
        TokenLayout(77, 2, 50).id_slice(2)
    with pytest.raises(ValueError, match="has 77 tokens but the layout expects 177"):
        TokenLayout(77, 2, 50).check_context(torch.zeros(1, 77, 8))
