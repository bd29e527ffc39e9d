"""One seam installs the masked layer for every caller: the nodes' UNet patch, the ControlNet wrapper
(and the trainer, tests/test_train_model.py) take their layers from ``wrap_cross_attention``, keyed by
module path, so a path names the same layer everywhere."""
from __future__ import annotations

import pytest
import torch

from instantfamily_nodes.attention.layer import MaskedCrossAttention, install_layers, wrap_cross_attention


@pytest.fixture(scope="module")
def tiny(comfyui, tmp_path_factory):
    import comfy.sd

    from instantfamily_nodes.demo.tiny import build_tiny_models, register_tiny_model_type

    register_tiny_model_type()
    models = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(models.root / "checkpoints" / models.checkpoint),
                                                      output_vae=False, output_clip=False)
    return models, model


def _masked_paths(root: torch.nn.Module) -> set[str]:
    return {name for name, m in root.named_modules() if isinstance(m, MaskedCrossAttention)}


def test_unet_patch_and_controlnet_use_the_seam_paths(tiny):
    import comfy.controlnet

    from instantfamily_nodes.attention.layer import IdentityBinding
    from instantfamily_nodes.attention import IDMasks, TokenLayout
    from instantfamily_nodes.nodes import patching

    models, model = tiny
    seam = set(wrap_cross_attention(model.get_model_object("diffusion_model")))
    assert len(seam) == 16                                   # SD1.5's cross-attention layers
    binding = IdentityBinding(TokenLayout(77, 1, 2), IDMasks(torch.ones(1, 8, 8)))
    patched = patching.patch_unet(model, binding)
    assert set(patched.object_patches) == {f"diffusion_model.{p}" for p in seam}

    path = str(models.root / "controlnet" / models.controlnet)
    plain = comfy.controlnet.load_controlnet(path).control_model
    control_seam = set(wrap_cross_attention(plain))
    wrapped = patching.load_controlnet(path).control_model
    assert len(control_seam) == 7 and _masked_paths(wrapped) == control_seam
    # Wrapping again through the seam gives the same paths (a wrapper never wraps a wrapper).
    assert set(wrap_cross_attention(wrapped)) == control_seam
    assert all(not isinstance(m.inner, MaskedCrossAttention) for m in wrap_cross_attention(wrapped).values())


def test_a_custom_factory_is_installed_in_place_and_runs():
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = 1
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(4, 4) for _ in range(3))
            self.to_out = torch.nn.Sequential(torch.nn.Linear(4, 4))

        def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
            return x

    class Tagged(torch.nn.Module):
        calls = 0

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, **kwargs):
            Tagged.calls += 1
            return self.inner(x, **kwargs) * 2

    root = torch.nn.Module()
    root.block = torch.nn.Module()
    root.block.attn2 = Inner()
    root.block.attn1 = Inner()
    layers = wrap_cross_attention(root, factory=Tagged)
    assert list(layers) == ["block.attn2"]
    install_layers(root, layers)
    assert isinstance(root.block.attn2, Tagged) and isinstance(root.block.attn1, Inner)
    x = torch.ones(1, 3, 4)
    assert torch.equal(root.block.attn2(x), 2 * x) and Tagged.calls == 1
