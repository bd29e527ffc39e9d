"""ComfyUI side of the patch: one mechanism for the UNet and the ControlNet.

Both get their cross-attention modules replaced by ``attention.layer.MaskedCrossAttention``:
- UNet: as ModelPatcher object patches on a clone (swapped in at patch time, out at unpatch, so the
  original model is never touched and clones do not interfere). The binding travels in
  ``model_options["transformer_options"]["instantfamily"]``.
- ControlNet: ComfyUI does not pass transformer_options into control models, so the pack's loader
  returns an ``InstantFamilyControlNet`` whose cross-attention modules are wrapped once at load and
  whose ``get_control`` exposes the UNet's transformer_options to them for the duration of the call.
Later MoA experts and the trainer use the same wrapper and binding.
"""
from __future__ import annotations

import comfy.controlnet
import comfy.model_patcher
import comfy.supported_models
import torch

from ..attention.layer import OPTIONS_KEY, IdentityBinding, binding_scope, install_layers, wrap_cross_attention

SD15_CONTEXT = 768


def check_sd15(model: comfy.model_patcher.ModelPatcher, name: str = "model") -> None:
    """Refuse anything that is not an SD1.5-family UNet, saying what to use instead."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    if not isinstance(config, comfy.supported_models.SD15):
        kind = type(config).__name__ if config is not None else type(model).__name__
        raise ValueError(
            f"{name}: InstantFamily supports SD1.5 models only, this is {kind}. SDXL, SD3 and Flux have "
            "other text widths and attention layouts; load an SD1.5 checkpoint"
        )


def patch_unet(model: comfy.model_patcher.ModelPatcher, binding: IdentityBinding) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` whose every cross-attention runs masked attention under ``binding``."""
    check_sd15(model)
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    wrappers = wrap_cross_attention(diffusion_model)
    if not wrappers:
        raise ValueError("model: no cross-attention layers found to patch")
    for path, wrapper in wrappers.items():
        patched.add_object_patch(f"diffusion_model.{path}", wrapper)
    patched.model_options.setdefault("transformer_options", {})[OPTIONS_KEY] = binding
    return patched


class InstantFamilyControlNet(comfy.controlnet.ControlNet):
    """A ControlNet whose cross-attention runs the same masked attention as the patched UNet."""

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        with binding_scope(transformer_options):
            return super().get_control(x_noisy, t, cond, batched_number, transformer_options)

    def copy(self):
        c = super().copy()
        c.__class__ = InstantFamilyControlNet
        return c


def load_controlnet(path: str) -> InstantFamilyControlNet:
    """Load an SD1.5 (cldm) ControlNet with ComfyUI's loader and wrap its cross-attention."""
    return wrap_controlnet(comfy.controlnet.load_controlnet(path), path)


def wrap_controlnet(control, path: str = "control_net") -> InstantFamilyControlNet:
    """Turn a ControlNet ComfyUI loaded into one whose cross-attention runs masked attention."""
    if control is None or type(control) is not comfy.controlnet.ControlNet:
        raise ValueError(f"control_net_name: {path} is not a standard (cldm) ControlNet "
                         f"({type(control).__name__}); the pack needs an SD1.5 OpenPose-style ControlNet")
    context_dim = _context_dim(control.control_model)
    if context_dim != SD15_CONTEXT:
        raise ValueError(f"control_net_name: {path} has context width {context_dim}, not SD1.5's "
                         f"{SD15_CONTEXT}; use an SD1.5 ControlNet")
    install_layers(control.control_model, wrap_cross_attention(control.control_model))
    control.__class__ = InstantFamilyControlNet
    return control


def _context_dim(control_model: torch.nn.Module) -> int | None:
    for name, module in control_model.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            return module.to_k.weight.shape[1]
    return None
