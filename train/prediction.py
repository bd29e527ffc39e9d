"""What a diffusion UNet predicts, and the conversions between its output, the noise and the clean latent.

SD1.5 predicts the noise (``"eps"``); SD2.x-768 and v-prediction fine-tunes predict
``v = sqrt(a) eps - sqrt(1 - a) z0`` (Salimans & Ho 2022), with ``z_t = sqrt(a) z0 + sqrt(1 - a) eps`` and
``a`` the cumulative alpha at t. ComfyUI decides which when it loads a checkpoint (``ModelType``; a
top-level ``v_pred`` key marks v); the trainer and the synthetic world's base read it from there, so a
model is trained on the target it is sampled with.

At high noise, eps-prediction turns a small output error into an x0 error ``sqrt((1-a)/a)`` times
larger (x11 at t = 950, x15 at t = 999 on SD1.5's schedule); v-prediction's x0 error stays at the output
error's scale, which is why small or briefly trained models sample better with it.
"""
from __future__ import annotations

import torch

PREDICTIONS = ("eps", "v")


def prediction_of(model_patcher) -> str:
    """``"eps"`` or ``"v"`` for a ComfyUI ModelPatcher (checkpoint loader output); any other type
    (EDM, flow matching, ...) is refused: the InstantFamily recipe here is SD1.5's DDPM."""
    import comfy.model_base

    kind = model_patcher.model.model_type
    if kind == comfy.model_base.ModelType.EPS:
        return "eps"
    if kind == comfy.model_base.ModelType.V_PREDICTION:
        return "v"
    raise ValueError(f"checkpoint: model type {kind.name}; the trainer supports eps- and v-prediction "
                     "(SD1.5-style DDPM) checkpoints only")


def check_prediction(prediction: str) -> None:
    """Refuse anything but ``"eps"`` and ``"v"``, naming the setting."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: {prediction!r}; use one of {PREDICTIONS}")


def training_target(prediction: str, z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for ``z_t = sqrt(a) z0 + sqrt(1-a) noise`` (``alpha_bar`` broadcasts)."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z0


def eps_and_x0(prediction: str, output: torch.Tensor, z_t: torch.Tensor,
               alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) implied by the UNet's ``output`` at ``z_t`` (what a DDIM step needs)."""
    check_prediction(prediction)
    s, c = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "eps":
        return output, (z_t - c * output) / s
    return c * z_t + s * output, s * z_t - c * output
