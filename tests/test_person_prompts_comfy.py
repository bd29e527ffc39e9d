"""Per-person prompts in a real ComfyUI sampling run (tiny SD1.5-shaped models, CPU): isolation measured
inside a real UNet cross-attention layer, cond and uncond in one batched pass with the same layout,
prompts acting outside the IDs' sigma window, a person without an identity, long lines, and the nodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instantfamily_nodes.attention import layer as attention_module
from test_integration import attention_mass, env, fake_faces, id_masks, sample  # noqa: F401 - env is a fixture

LINES = "a red jacket\n\na blue hat"      # ID 0: a prompt; ID 1: none; person 2 (no photo): a prompt


def regions(h=256, w=256):
    """Person 0: left half; person 1: right half; person 2 (no identity): the bottom quarter."""
    r = torch.zeros(3, h, w)
    r[0, :, : w // 2] = 1
    r[1, :, w // 2:] = 1
    r[2, 3 * h // 4:, :] = 1
    return r


def person_prompts(env, lines=LINES, h=256, w=256, padding="trimmed"):
    from instantfamily_nodes.nodes.prompts import PersonPromptsNode

    return PersonPromptsNode.execute(env["clip"], lines, regions(h, w), 1.0, padding=padding).result


def words(env, line):
    """Tokens a line really has, counted from ComfyUI's tokenizer: per 77-token window the non-end
    tokens plus one end token (the rest of the window is end-token padding)."""
    return sum(sum(1 for t in chunk if t[0] != 49407) + 1 for chunk in env["clip"].tokenize(line)["l"])


def apply(env, lines=LINES, start=0.0, end=1.0, prompt="two people", padding="trimmed"):
    from instantfamily_nodes.nodes.instantfamily import Apply, EmbeddingStack, ProjectIDs

    pp, _ = person_prompts(env, lines, padding=padding)
    ids = ProjectIDs.execute(fake_faces(env["weights"]), env["weights"]).result[0]
    pos, neg = EmbeddingStack.execute(env["encode"](prompt), env["encode"](""), ids, env["weights"], pp).result
    model, pos, neg = Apply.execute(env["model"], pos, neg, id_masks(256, 256), 1.0, "", start, end, "hard",
                                    env["weights"]).result
    return model, pos, neg, pp


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = attention_module.masked_attention

    def recording(q, k, v, heads, layout, masks, grid, mode, kernel):
        calls.append((q.shape[0], layout, masks))
        return real(q, k, v, heads, layout, masks, grid, mode, kernel)

    monkeypatch.setattr(attention_module, "masked_attention", recording)
    return calls


def test_layout_and_negative(env):
    model, pos, neg, pp = apply(env)
    layout = pos[0][1]["instantfamily_layout"]
    # 77 text + 2 IDs x 50 + person prompts trimmed to their own tokens (start, words, end), none for
    # ID 1: the same layout on both sides.
    k0, k2 = words(env, "a red jacket"), words(env, "a blue hat")
    assert 3 <= k0 < 10 and 3 <= k2 < 10
    assert layout.prompt_lens == (k0, 0, k2) and layout.n_ids == 2
    assert neg[0][1]["instantfamily_layout"] == layout
    assert pos[0][0].shape[1] == neg[0][0].shape[1] == 77 + 100 + k0 + k2
    # The positive carries the first rows of each line's full (padded) CLIP encoding, which the causal
    # text encoder computes without looking at the padding; the negative the first rows of "".
    line0 = env["clip"].encode_from_tokens(env["clip"].tokenize("a red jacket"))
    empty = env["clip"].encode_from_tokens(env["clip"].tokenize(""))
    torch.testing.assert_close(pos[0][0][:, layout.prompt_slice(0)], line0.float()[:, :k0])
    torch.testing.assert_close(neg[0][0][:, layout.prompt_slice(2)], empty.float()[:, :k2])
    assert not torch.allclose(pos[0][0][:, layout.prompt_slice(2)], neg[0][0][:, layout.prompt_slice(2)])


def test_full_padding_keeps_the_77_token_windows(env):
    model, pos, neg, pp = apply(env, padding="full")
    layout = pos[0][1]["instantfamily_layout"]
    assert layout.prompt_lens == (77, 0, 77) and neg[0][1]["instantfamily_layout"] == layout
    line0 = env["clip"].encode_from_tokens(env["clip"].tokenize("a red jacket"))
    torch.testing.assert_close(pos[0][0][:, layout.prompt_slice(0)], line0.float())


def test_cond_and_uncond_run_in_one_pass(env, spy):
    model, pos, neg, _ = apply(env)
    sample(model, pos, neg, steps=2)
    assert len(spy) == 2 * 16 and {c[0] for c in spy} == {2}
    assert all(c[2].n_regions == 3 for c in spy)


@pytest.mark.parametrize("person", [0, 2])
def test_person_prompt_isolation_in_a_real_unet_layer(env, person):
    """Hard mode: values 1 on person p's prompt tokens, 0 elsewhere; the attention mass they get
    outside region p is < 1e-6 (exactly 0), inside it is > 1e-4. Person 2 has no identity."""
    model, pos, neg, _ = apply(env)
    layout = pos[0][1]["instantfamily_layout"]
    masses = attention_mass(model, pos, neg, layout, layout.prompt_slice(person))
    inside = torch.nn.functional.interpolate(regions()[None], size=(32, 32), mode="area")[0, person] > 0
    for mass in masses:
        assert mass[:, ~inside].abs().max() < 1e-6
        assert mass[:, inside].min() > 1e-4


def test_prompts_act_outside_the_identity_window(env, spy):
    """IDs act in the first half only; the person prompts act in every step (IDs switched off)."""
    model, pos, neg, _ = apply(env, start=0.5, end=1.0)
    sample(model, pos, neg, steps=4)
    assert len(spy) == 4 * 16
    off = [c for c in spy if bool((c[2].strength == 0).all())]
    assert 0 < len(off) < len(spy)
    assert all(c[2].n_regions == 3 for c in off)


def test_long_line_and_sampling_is_finite(env, spy):
    long = "a red jacket with golden buttons, " * 12     # > 77 tokens: two CLIP windows
    model, pos, neg, _ = apply(env, lines=f"{long}\nsmiling")
    layout = pos[0][1]["instantfamily_layout"]
    assert layout.prompt_lens == (words(env, long), words(env, "smiling"), 0)
    assert 77 < layout.prompt_lens[0] < 154        # two windows: the first full, the second trimmed
    assert neg[0][0].shape == pos[0][0].shape
    out = sample(model, pos, neg, steps=2)
    assert torch.isfinite(out).all() and {c[0] for c in spy} == {2}


def test_person_prompts_node_preview_and_errors(env):
    from instantfamily_nodes.nodes.prompts import PersonPromptsNode
    from instantfamily_nodes.palette import id_color

    pp, preview = person_prompts(env)
    assert pp.lines == ("a red jacket", "", "a blue hat") and pp.cond[1] is None
    img = (preview[0].numpy() * 255).round().astype(np.uint8)
    assert img.shape == (256, 256, 3)
    # The label of person 0 is written in its ID colour (red) near its region's top-left corner.
    corner = img[2:24, 2:128].reshape(-1, 3)
    assert (np.abs(corner.astype(int) - id_color(0)).sum(-1) < 40).sum() > 10
    with pytest.raises(ValueError, match="prompts: 4 lines but only 3 regions"):
        PersonPromptsNode.execute(env["clip"], "a\nb\nc\nd", regions(), 1.0)
    empty = regions()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"region\(s\) \[2\] are empty but their people have prompts"):
        PersonPromptsNode.execute(env["clip"], LINES, empty, 1.0)
    with pytest.raises(ValueError, match="no prompt given"):
        PersonPromptsNode.execute(env["clip"], "\n\n", regions(), 1.0)
    # From the region editor's JSON when the text is empty.
    js = ('{"version": 1, "regions": [{"id": 0, "shape": "rect", "x": 0, "y": 0, "w": 0.5, "h": 1, "prompt": '
          '"a red jacket"}, {"id": 1, "shape": "rect", "x": 0.5, "y": 0, "w": 0.5, "h": 1}]}')
    pp2, _ = PersonPromptsNode.execute(env["clip"], "", regions()[:2], 1.0, js).result
    assert pp2.lines == ("a red jacket", "")


def test_person_regions_node_follows_the_id_order(env):
    from instantfamily_nodes.nodes.prompts import PersonRegions
    from instantfamily_nodes.pose import templates

    pose = templates.template_pose_keypoint("3_standing_trio")
    left, _ = PersonRegions.execute(pose, 2, "left_to_right", 0, 0, 0, 0.2, "rect", 0).result
    swapped, _ = PersonRegions.execute(pose, 2, "1,0", 0, 0, 0, 0.2, "rect", 0).result
    assert left.shape[0] == 3                                  # 2 people with IDs + 1 without
    assert torch.equal(left[0], swapped[1]) and torch.equal(left[1], swapped[0])
    assert torch.equal(left[2], swapped[2])                    # the person without an ID stays last
    cx = [float(np.nonzero(m.numpy().any(0))[0].mean()) for m in left]
    assert cx[0] < cx[1]                                       # ID 0 is the leftmost face
