"""A drop-in cross-attention module that runs masked attention whenever its context carries IDs.

It wraps an existing cross-attention module (anything with ``to_q``/``to_k``/``to_v``/``to_out`` and
``heads``, e.g. ComfyUI's ``CrossAttention``) and reuses its projection weights, so the UNet patch,
the ControlNet patch and the trainer all run the same code. The projections are re-registered on
the wrapper under their own names, so weight paths such as ``...attn2.to_k.weight`` (LoRA keys)
resolve to the same tensors while the wrapper is in place.

What to do for one generation comes in an ``IdentityBinding`` found under
``transformer_options["instantfamily"]`` (the host's per-call options), or, for hosts that do not
pass options down (ComfyUI's ControlNet), in the ``binding_scope`` context variable.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .layout import TEXT_CHUNK, TokenLayout
from .masked import KERNELS, masked_attention
from .masks import IDMasks, check_mode

OPTIONS_KEY = "instantfamily"
_scoped_options: contextvars.ContextVar[dict | None] = contextvars.ContextVar("instantfamily_options", default=None)


@dataclass(eq=False)
class IdentityBinding:
    """Which identities a context holds, where each may act, how strongly, and when.

    The IDs act while ``sigma_end <= sigma <= sigma_start``; outside that window the layer attends
    to the text tokens only, exactly as the unpatched model would (plus the per-person prompts, each
    in its region, when the layout has any: those are text, not identity).
    """

    layout: TokenLayout
    masks: IDMasks
    mode: str = "hard"
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    kernel: str = "auto"

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        self.masks.check_layout(self.layout)

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; a binding is read-only.
        return self

    def active(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start


@contextlib.contextmanager
def binding_scope(transformer_options: dict | None) -> Iterator[None]:
    """Make ``transformer_options`` visible to wrapped layers whose host does not pass them."""
    token = _scoped_options.set(transformer_options)
    try:
        yield
    finally:
        _scoped_options.reset(token)


def _current_sigma(options: dict) -> float | None:
    sigmas = options.get("sigmas")
    if sigmas is None:
        return None
    return float(sigmas.reshape(-1)[0])


def resolve_options(transformer_options: dict | None) -> tuple[dict, "IdentityBinding | None"]:
    """This call's options and identity binding: the host's transformer_options, or, for hosts that do
    not pass them down (ComfyUI's ControlNet), the ones made visible by :func:`binding_scope`."""
    options = transformer_options or {}
    binding: IdentityBinding | None = options.get(OPTIONS_KEY)
    if binding is None:
        scoped = _scoped_options.get()
        if scoped is not None:
            binding = scoped.get(OPTIONS_KEY)
            options = {**scoped, **options}
    return options, binding


class MaskedCrossAttention(nn.Module):
    """Cross-attention over [text ; IDs] with each ID visible only inside its mask."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        if isinstance(inner, MaskedCrossAttention):
            inner = inner.inner
        for name in ("to_q", "to_k", "to_v", "to_out"):
            setattr(self, name, getattr(inner, name))
        self.heads: int = inner.heads
        # Not a registered submodule: the projections above are its only parameters.
        object.__setattr__(self, "inner", inner)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, transformer_options: dict | None = None) -> torch.Tensor:
        options, binding = resolve_options(transformer_options)
        # ``value``: ComfyUI passes it (= the context, or what an attn2_patch made of it) whenever an
        # attn2_patch is set; the masked attention takes it, so such patches compose with the IDs.
        if binding is None or context is None or mask is not None:
            return self.inner(x, context=context, value=value, mask=mask, transformer_options=options)

        layout = binding.layout
        n_tokens = context.shape[1]
        if n_tokens != layout.total:
            if n_tokens % TEXT_CHUNK == 0:
                # A text-only context (another conditioning in the same graph): plain attention.
                return self.inner(x, context=context, value=value, transformer_options=options)
            raise ValueError(
                f"cross-attention context has {n_tokens} tokens, but the identity stack is laid out as "
                f"{layout.describe()} = {layout.total}. Build positive and negative with the same "
                "InstantFamily Embedding Stack, and do not combine them with other conditioning"
            )
        masks = binding.masks
        if not binding.active(_current_sigma(options)):
            if not layout.has_prompts:
                return self.inner(x, context=context[:, layout.text_slice],
                                  value=None if value is None else value[:, layout.text_slice],
                                  transformer_options=options)
            # The window is the identities'; person prompts act in every step, like the shared prompt.
            masks = masks.ids_off()

        grid = _grid(options, x)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context if value is None else value)
        out = masked_attention(q, k, v, self.heads, layout, masks, grid, binding.mode, binding.kernel)
        return self.to_out(out)


def _grid(options: dict, x: torch.Tensor) -> tuple[int, int]:
    """The exact latent grid of this layer: the host's activations_shape, checked against x."""
    shape = options.get("activations_shape")
    if shape is None or shape[-2] * shape[-1] != x.shape[1]:
        raise ValueError(
            f"cannot tell the latent grid of a cross-attention layer with {x.shape[1]} query pixels "
            f"(activations_shape={shape}); the host must set transformer_options['activations_shape']"
        )
    return int(shape[-2]), int(shape[-1])


LayerFactory = Callable[[nn.Module], nn.Module]


def wrap_cross_attention(root: nn.Module, factory: LayerFactory = MaskedCrossAttention,
                         suffix: str = "attn2") -> dict[str, nn.Module]:
    """The seam every caller installs its layers through: the replacement for each module named
    ``*.<suffix>`` under ``root``, made by ``factory`` (default: the masked layer), keyed by module path.

    The nodes' UNet patch (as ModelPatcher object patches), the ControlNet wrapper and the trainer
    (both through :func:`install_layers`) all take their layers from here, so a path such as
    ``input_blocks.1.1.transformer_blocks.0.attn2`` names the same layer for all of them and exported
    weight keys equal the module paths the nodes see."""
    return {name: factory(module) for name, module in root.named_modules()
            if name.split(".")[-1] == suffix and module is not None}


def install_layers(root: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put ``layers`` (from :func:`wrap_cross_attention`) in place under ``root``, in place."""
    for path, module in layers.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, leaf, module)
