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
import comfy.patcher_extension
import comfy.supported_models
import torch

from ..attention.layer import OPTIONS_KEY, IdentityBinding, binding_scope, install_layers, wrap_cross_attention
from ..pose.canvas import check_same_aspect

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


def refuse_attn2_replacements(transformer_options: dict, when: str) -> None:
    """Refuse other packs' ``attn2`` replace patches (IPAdapter, PuLID, InstantID packs set them).

    ComfyUI calls such a patch with the layer's projections directly and never runs the layer's
    forward, so the masked layer would be skipped and every identity would act everywhere. Their
    attention is a black box (it computes its own softmax), so it cannot be masked exactly: refused.
    Patches before or after the layer (``attn2_patch``, ``attn2_output_patch``) compose and are fine."""
    blocks = sorted(transformer_options.get("patches_replace", {}).get("attn2", {}), key=str)
    if blocks:
        names = ", ".join(" ".join(str(part) for part in block) for block in blocks)
        raise ValueError(
            f"model: a node {when} replaces the cross-attention (attn2) of blocks {names}, as IPAdapter, "
            "PuLID and InstantID nodes do. ComfyUI would then run that node's attention instead of "
            "InstantFamily's masked layer, and every identity would act everywhere in the picture. Use a "
            "model without that node's patch for InstantFamily (LoRAs and attn2 input/output patches work)"
        )


def _guard(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
    """Run-time checks around every UNet call of a patched model (a ComfyUI DIFFUSION_MODEL wrapper):
    replace patches added after Apply, and masks of another aspect than the latent being sampled."""
    options = transformer_options or {}
    refuse_attn2_replacements(options, "added after InstantFamily Apply")
    binding = options.get(OPTIONS_KEY)
    if binding is not None:
        check_same_aspect(tuple(binding.masks.masks.shape[-2:]), tuple(x.shape[-2:]), "masks",
                          "the latent (image size / 8)",
                          "Make the masks (and the pose) at the size of the image you generate, e.g. link the "
                          "Empty Latent Image's width and height into Pose Control", step=1)
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def patch_unet(model: comfy.model_patcher.ModelPatcher, binding: IdentityBinding) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` whose every cross-attention runs masked attention under ``binding``."""
    check_sd15(model)
    refuse_attn2_replacements(model.model_options.get("transformer_options", {}), "applied before InstantFamily")
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    wrappers = wrap_cross_attention(diffusion_model)
    if not wrappers:
        raise ValueError("model: no cross-attention layers found to patch")
    for path, wrapper in wrappers.items():
        patched.add_object_patch(f"diffusion_model.{path}", wrapper)
    patched.model_options.setdefault("transformer_options", {})[OPTIONS_KEY] = binding
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, OPTIONS_KEY, _guard)
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
