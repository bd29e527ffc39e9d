"""train/loss.py: the weighted eps-MSE against hand computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from instantfamily_nodes.train.loss import weighted_mse


def _half_error(right: bool) -> tuple[torch.Tensor, torch.Tensor]:
    eps, noise = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    if right:
        noise[..., 4:] = 2.0          # squared error 4 on the right half
    else:
        noise[..., :4] = 2.0
    return eps, noise


def test_zero_weight_is_the_plain_mse():
    g = torch.Generator().manual_seed(0)
    eps, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    fg = (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float()
    assert torch.equal(weighted_mse(eps, noise, fg, 0.0), F.mse_loss(eps, noise))
    assert torch.equal(weighted_mse(eps, noise, None, 5.0), F.mse_loss(eps, noise))
    # no face anywhere: the weights are all 1, the plain MSE again
    torch.testing.assert_close(weighted_mse(eps, noise, torch.zeros(2, 1, 64, 64), 5.0), F.mse_loss(eps, noise))


def test_face_pixels_count_one_plus_w_times():
    fg = torch.zeros(1, 1, 64, 64)
    fg[..., 32:] = 1                  # the face mask: the right half (4 of 8 latent columns)
    w = 3.0
    # 32 latent pixels of weight 1 and 32 of weight 4 per channel: sum of weights 160
    assert float(weighted_mse(*_half_error(right=False), fg, w)) == pytest.approx(32 * 4 / 160)
    assert float(weighted_mse(*_half_error(right=True), fg, w)) == pytest.approx(32 * 4 * 4 / 160)


def test_a_mask_edge_inside_a_latent_pixel_weighs_by_its_area():
    fg = torch.zeros(1, 1, 64, 64)
    fg[..., 36:] = 1                  # latent column 4 half covered: weight 1 + w/2 there
    eps, noise = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    noise[..., 4] = 1.0               # error 1 on that column only
    w = 2.0
    weights = 4 * 8 * 1.0 + 8 * (1 + w / 2) + 3 * 8 * (1 + w)
    assert float(weighted_mse(eps, noise, fg, w)) == pytest.approx(8 * (1 + w / 2) / weights)


def test_negative_weight_is_refused_naming_it():
    with pytest.raises(ValueError, match="face_loss_weight"):
        weighted_mse(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 16, 16), -1.0)
