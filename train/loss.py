"""The diffusion losses a training step can use: the MSE between the UNet's output and its target over
latent pixels (eq. 3; the target is the noise for SD1.5's eps-prediction, v for a v-prediction
checkpoint: :mod:`.prediction`), with a weight.

- :func:`weighted_mse`: the paper's plain mean squared error, or with ``face_loss_weight`` w > 0 every latent
  pixel inside a present ID's mask (face box + margin) counted 1 + w times. Beyond the paper: faces are a
  small part of a picture (a 4-person 512 px group photo: ~5 % of the latent), and the ID projection learns
  only from the pixels its masked tokens reach, so weighting them spends more of each step on identity.
- :func:`masked_mse`: the foreground only (MoA's ``moa_masked_loss``).

Masks reach latent size by area averaging, so a mask edge between latent pixels weighs in proportion.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def foreground(batch, device) -> torch.Tensor:
    """(B, 1, R, R) union of the present IDs' masks (empty slots contribute nothing)."""
    m = batch.masks.to(device, torch.float32) * batch.id_present.to(device, torch.float32)[..., None, None]
    return m.amax(1, keepdim=True) if m.shape[1] else m.new_zeros(m.shape[0], 1, *m.shape[-2:])


def masked_mse(output: torch.Tensor, target: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """MSE over the foreground latent pixels; the plain MSE when no sample has a foreground."""
    m = F.interpolate(fg, size=output.shape[-2:], mode="area")
    denom = m.sum() * output.shape[1]
    if float(denom) == 0:
        return F.mse_loss(output.float(), target)
    return (m * (output.float() - target) ** 2).sum() / denom


def weighted_mse(output: torch.Tensor, target: torch.Tensor, fg: torch.Tensor | None = None,
                 face_loss_weight: float = 0.0) -> torch.Tensor:
    """Weighted mean of (output - target)^2: weight 1 + ``face_loss_weight`` x mask (at latent size),
    normalised by the weights' sum, so a batch without faces (or w = 0) gives exactly the plain MSE."""
    if face_loss_weight < 0:
        raise ValueError(f"face_loss_weight must be >= 0, got {face_loss_weight}")
    if face_loss_weight == 0 or fg is None:
        return F.mse_loss(output.float(), target)
    w = 1.0 + face_loss_weight * F.interpolate(fg.float(), size=output.shape[-2:], mode="area")
    return (w * (output.float() - target) ** 2).sum() / (w.sum() * output.shape[1])
