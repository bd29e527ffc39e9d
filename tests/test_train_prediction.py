"""eps / v parameterisation (train/prediction.py) against hand computations in float64."""
from __future__ import annotations

import pytest
import torch

from instantfamily_nodes.train.prediction import eps_and_x0, training_target


def test_v_target_by_hand():
    # a = 0.64: sqrt(a) = 0.8, sqrt(1 - a) = 0.6; z0 = 2, eps = 1 -> z_t = 2.2, v = 0.8 - 1.2 = -0.4
    f64 = torch.float64
    z0, eps, a = torch.tensor([2.0], dtype=f64), torch.tensor([1.0], dtype=f64), torch.tensor(0.64, dtype=f64)
    assert float(training_target("v", z0, eps, a)) == pytest.approx(-0.4)
    assert float(training_target("eps", z0, eps, a)) == 1.0
    e, x0 = eps_and_x0("v", torch.tensor([-0.4], dtype=torch.float64), torch.tensor([2.2], dtype=torch.float64), a)
    assert (float(e), float(x0)) == (pytest.approx(1.0), pytest.approx(2.0))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_target_maps_back_to_the_noise_and_the_clean_latent(prediction):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    a = torch.tensor([0.999, 0.5, 0.005], dtype=torch.float64).view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    e, x0 = eps_and_x0(prediction, training_target(prediction, z0, eps, a), z_t, a)
    torch.testing.assert_close(e, eps)
    torch.testing.assert_close(x0, z0)


def test_v_error_becomes_a_bounded_x0_error_at_high_noise():
    """The reason to offer v: the same output error costs x0 sqrt((1-a)/a) times more under eps (x14 at
    a = 0.005), and at most 1x under v."""
    a = torch.tensor(0.005, dtype=torch.float64)
    z_t = torch.zeros(1, dtype=torch.float64)
    err = torch.ones(1, dtype=torch.float64)
    _, x0_eps = eps_and_x0("eps", err, z_t, a)
    _, x0_v = eps_and_x0("v", err, z_t, a)
    assert abs(float(x0_eps)) == pytest.approx(float(((1 - a) / a).sqrt()))
    assert abs(float(x0_v)) == pytest.approx(float((1 - a).sqrt()))


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        training_target("x0", torch.zeros(1), torch.zeros(1), torch.tensor(0.5))
