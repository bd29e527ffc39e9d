"""Apply never stretches masks onto another aspect (issue 9, defect 2): masks of another aspect than
the control image are refused at Apply, and than the latent when sampling, naming both sizes.
Pose Control / ID Masks apply the same rule to their canvas (test_nodes_pose.py); pose/canvas.py holds it."""
from __future__ import annotations

import pytest
import torch

from instantfamily_nodes.pose.canvas import check_same_aspect, fit_canvas, same_aspect
from test_integration import apply, env, id_masks, sample  # noqa: F401  (fixtures)


def test_the_aspect_rule_by_hand():
    # against a latent grid (step 1 latent pixel)
    assert same_aspect((512, 768), (64, 96), step=1)            # a uniform scale
    assert same_aspect((1000, 1500), (125, 188), step=1)        # 187.5 rounds: within one latent pixel
    assert not same_aspect((512, 512), (64, 96), step=1)
    assert not same_aspect((512, 768), (64, 92), step=1)        # 4 latent pixels (4%) off
    with pytest.raises(ValueError, match=r"masks is 512x512 \(WxH\) but the latent is 96x64: aspect ratios 1.000 and 1.500"):
        check_same_aspect((512, 512), (64, 96), "masks", "the latent", "fix it", step=1)
    # between image sizes (step 8 px, ComfyUI's size step): a 768x512 pose at 256 px wide is 256x168
    assert same_aspect((512, 768), (168, 256)) and same_aspect((512, 768), (176, 256))
    assert not same_aspect((512, 768), (184, 256)) and not same_aspect((512, 768), (512, 512))
    assert fit_canvas((512, 768), 0, 0, "pose") == (512, 768)
    assert fit_canvas((512, 768), 384, 0, "pose") == (256, 384)
    assert fit_canvas((512, 768), 0, 100, "pose") == (100, 150)
    assert fit_canvas((512, 768), 1152, 768, "pose") == (768, 1152)


def test_masks_of_another_aspect_than_the_latent_are_refused_when_sampling(env):
    model, pos, neg = apply(env, h=256, w=256)                       # square masks
    with pytest.raises(ValueError, match=r"masks is 256x256 \(WxH\) but the latent \(image size / 8\) is 48x32"):
        sample(model, pos, neg, h=256, w=384, steps=1)
    model, pos, neg = apply(env, h=128, w=192)                       # same aspect as 256x384: fine
    assert torch.isfinite(sample(model, pos, neg, h=256, w=384, steps=1)).all()


def test_masks_of_another_aspect_than_the_control_image_are_refused_at_apply(env):
    from instantfamily_nodes.nodes.instantfamily import Apply

    _, pos, neg = apply(env)
    with pytest.raises(ValueError, match=r"masks is 256x256 \(WxH\) but image is 384x256"):
        Apply.execute(env["model"], pos, neg, id_masks(256, 256), 1.0, "", 0.0, 1.0, "hard", env["weights"],
                      control_net=env["control"], image=torch.rand(1, 256, 384, 3))
