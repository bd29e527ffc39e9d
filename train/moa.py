"""MoA training (MoA paper sec. 3.3): experts and routers in the UNet, the router loss, the masked loss.

What the trainer does with ``moa = true``:

- Every UNet cross-attention layer (and self-attention with ``moa_self_attention``) becomes an
  ``attention.moa.MoALayer`` through the pack's one seam (``moa_layers`` -> ``install_layers``): the
  prior expert is the frozen layer itself on the text tokens, the personalised expert starts as a
  copy of the layer (sec. 3.2: "we initialise both experts from the pretrained layer") and trains,
  the router is zero-initialised (50/50) and trains. The ControlNet keeps the masked layers.
- The expert and router parameters are their own optimiser group, ``moa`` (lr ``lr_moa``).
- Router loss (eq. 9-10): background pixels pushed to the prior. Per penalised layer l, at its own
  grid, mean over the batch and pixels of (1 - M) * (1 - R_l^prior)^2, where M is the union of the
  sample's ID masks (area-resized); summed over the penalised layers (every layer but those of the
  first ``moa_exclude_first`` and last ``moa_exclude_last`` transformer blocks: the paper's "first
  two and last three attention layers"), times ``moa_router_weight`` (1e-4, the paper's weight).
- ``moa_masked_loss``: the reconstruction loss over the foreground only (the ID masks at latent
  size; sec. 3.3.2: the frozen prior keeps the background, so only the subjects need fitting). Our
  batches carry face masks (face box + margin), not person segmentations: the foreground is the
  faces.
- Weights: ``trainable_state_dict`` keys ``moa.<module path>.<param>``, exactly the keys the pack's
  weight file stores and the MoA node validates against its live layers.

Gradient checkpointing: the recomputation in backward appends the routers' outputs again; the loss
reads the entries of the forward pass only (they were recorded first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.layer import install_layers
from ..attention.moa import (
    MOA_KEY,
    ROUTERS,
    MoABinding,
    MoAConfig,
    MoALayer,
    load_moa_state_dict,
    moa_layers,
    moa_state_dict,
)
from .loss import foreground, masked_mse

GROUP = "moa"


@dataclass(frozen=True)
class MoASettings:
    self_attention: bool = False
    router: str = "linear"
    router_weight: float = 1e-4
    masked_loss: bool = False
    exclude_first: int = 2
    exclude_last: int = 3

    @classmethod
    def from_config(cls, cfg) -> MoASettings:
        """The ``moa_*`` keys of a TrainConfig (defaults where a config predates them)."""
        s = cls(self_attention=bool(getattr(cfg, "moa_self_attention", False)),
                router=str(getattr(cfg, "moa_router", "linear")),
                router_weight=float(getattr(cfg, "moa_router_weight", 1e-4)),
                masked_loss=bool(getattr(cfg, "moa_masked_loss", False)),
                exclude_first=int(getattr(cfg, "moa_exclude_first", 2)),
                exclude_last=int(getattr(cfg, "moa_exclude_last", 3)))
        if s.router not in ROUTERS:
            raise ValueError(f"config key 'moa_router' = {s.router!r}: must be one of {ROUTERS}")
        if s.router_weight < 0:
            raise ValueError(f"config key 'moa_router_weight' = {s.router_weight}: must be >= 0")
        if s.exclude_first < 0 or s.exclude_last < 0:
            raise ValueError("config keys 'moa_exclude_first'/'moa_exclude_last' must be >= 0")
        return s


def router_loss(record: list, fg: torch.Tensor) -> torch.Tensor:
    """Sum over the penalised layers' records of mean((1 - M) * (1 - w_prior)^2) at each layer's grid."""
    total = fg.new_zeros(())
    seen: set[int] = set()
    for layer, w_prior, grid in record:
        if id(layer) in seen:   # a checkpointed block recomputed in backward: count the forward only
            continue
        seen.add(id(layer))
        if not layer.penalised:
            continue
        bg = 1 - F.interpolate(fg, size=grid, mode="area").flatten(1)           # (B, Q)
        total = total + (bg * (1 - w_prior.float()) ** 2).mean()
    return total


class MoATraining(nn.Module):
    """The trained MoA parts of a UNet (registered here so TrainModel's parameters/DDP see them; the
    layers themselves live in the UNet) and the loss terms."""

    def __init__(self, unet: nn.Module, settings: MoASettings):
        super().__init__()
        self.settings = settings
        config = MoAConfig(self_attention=settings.self_attention, router=settings.router,
                           exclude_first=settings.exclude_first, exclude_last=settings.exclude_last)
        layers = moa_layers(unet, config, share_expert=False)     # experts: copies of the layers
        install_layers(unet, layers)
        object.__setattr__(self, "layers", layers)
        self.parts = nn.ModuleList(nn.ModuleDict({"expert": lay.expert, "router": lay.router})
                                   for lay in layers.values())
        self.requires_grad_(True)
        self._record: list = []
        self.last: dict[str, torch.Tensor] = {}

    def parameters_list(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def options(self) -> dict:
        """transformer_options entries for one UNet call: learned routing, the routers' outputs recorded
        for the loss (a fresh list per call, so sampling loops hold one call's worth at most)."""
        self._record = []
        return {MOA_KEY: MoABinding("learned", record=self._record)}

    def state(self) -> dict[str, torch.Tensor]:
        return moa_state_dict(self.layers)

    def load_state(self, sd: dict[str, torch.Tensor]) -> None:
        load_moa_state_dict(self.layers, sd, source="trainable state")

    def loss(self, output: torch.Tensor, target: torch.Tensor, batch) -> torch.Tensor:
        fg = foreground(batch, output.device)
        rec = masked_mse(output, target, fg) if self.settings.masked_loss else F.mse_loss(output.float(), target)
        router = router_loss(self._record, fg)
        self.last = {"reconstruction": rec.detach(), "router": router.detach()}
        return rec + self.settings.router_weight * router


def attach(model) -> MoATraining:
    """Turn a TrainModel's UNet attention into MoA layers and register their trained parts as
    ``model.moa`` (call once, after the UNet is frozen)."""
    moa = MoATraining(model.unet, MoASettings.from_config(model.cfg)).to(model.device)
    model.moa = moa
    return moa


def penalised_paths(layers: dict[str, MoALayer]) -> list[str]:
    return [p for p, lay in layers.items() if lay.penalised]
