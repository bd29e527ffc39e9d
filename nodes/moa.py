"""MoA nodes: switch Mixture-of-Attention on over an Apply'd model, preview the router, morph people.

Thin glue. The MoA layers (``attention.moa``) go in as ModelPatcher object patches on a clone, at the
same module paths as Apply's masked layers (``wrap_cross_attention``'s paths), so ComfyUI swaps them
in at patch time and out at unpatch, and moves their expert/router weights with the model when it
loads or offloads it (``ModelPatcher.load`` walks the patched module tree).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention.layer import OPTIONS_KEY
from ..attention.masks import IDMasks
from ..attention.moa import (
    MOA_KEY,
    ROUTER_MODES,
    MoABinding,
    MoAConfig,
    RouterCapture,
    config_from_tensors,
    extra_bytes,
    grow_and_feather,
    load_moa_state_dict,
    moa_layers,
)
from ..attention.moa_preview import render_router_maps
from ..models.id_stack import IDStack
from ..models.morph import morph_faces, morph_tokens
from ..models.weights import WeightFile
from .faces import FACES
from .instantfamily import CATEGORY, IDS, WEIGHTS, _parse_strengths
from .patching import check_sd15

ROUTER_MAPS = io.Custom("INSTANTFAMILY_ROUTER_MAPS")
CALLBACK_KEY = "instantfamily_moa"


class RouterMaps:
    """What the preview node reads: the capture the MoA layers fill, and the ID masks for colours."""

    def __init__(self, capture: RouterCapture, masks: torch.Tensor):
        self.capture = capture
        self.masks = masks

    def __deepcopy__(self, memo):
        return self


def patch_moa(model, moa: MoABinding, config: MoAConfig | None = None, weights: WeightFile | None = None):
    """A clone of ``model`` (patched by InstantFamily Apply) whose attention layers are MoA layers.
    With ``weights`` holding ``moa.*`` tensors the experts and routers are loaded (validated against
    the live layers); without, the personalised expert shares the layer's own projections (the
    training-free modes) and the clone costs no extra weight memory."""
    check_sd15(model)
    options = model.model_options.get("transformer_options", {})
    if options.get(OPTIONS_KEY) is None:
        raise ValueError("model: no identities bound; connect the MODEL output of InstantFamily Apply")
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    trained = weights is not None and bool(weights.group("moa"))
    layers = moa_layers(diffusion_model, config or MoAConfig(), share_expert=not trained)
    if trained:
        load_moa_state_dict(layers, weights.tensors, source="weights")
    for path, layer in layers.items():
        patched.add_object_patch(f"diffusion_model.{path}", layer)
    # ComfyUI budgets memory by model_size(); count the MoA weights so offloading decisions see them.
    patched.size = patched.model_size() + extra_bytes(layers)
    patched.model_options.setdefault("transformer_options", {})[MOA_KEY] = moa
    if moa.capture is not None:
        import comfy.patcher_extension

        capture = moa.capture
        patched.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, CALLBACK_KEY)
        patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, CALLBACK_KEY,
                                      lambda _patcher: capture.reset())
    return patched


class MoA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyMoA",
            display_name="InstantFamily MoA",
            category=CATEGORY,
            description="Mixture-of-Attention: each attention layer mixes the base model (prior, text only) "
            "and a personalised expert (text + IDs, masked) per pixel, so the scene stays the base model's and "
            "identities appear only where the router sends them.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of InstantFamily Apply."),
                io.Combo.Input("router", options=list(ROUTER_MODES), default="mask",
                               tooltip="learned: trained routers (needs MoA weights). mask: the ID masks, grown and "
                               "feathered, are the personalised share (training-free). prior: base model only. "
                               "personalised: the expert everywhere."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scales the personalised share (clamped to 1): 0 = base model."),
                io.String.Input("id_strengths", default="",
                                tooltip="Optional per-ID scale of the personalised share, e.g. '1, 0.5'."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="When in sampling the personalised expert starts to act."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="When in sampling it stops acting (the base model alone after)."),
                io.Int.Input("mask_grow", default=8, min=0, max=256,
                             tooltip="mask router: grow each ID mask by this many image pixels."),
                io.Int.Input("mask_feather", default=16, min=0, max=256,
                             tooltip="mask router: feather radius in image pixels (soft edge)."),
                io.Boolean.Input("self_attention", default=False,
                                 tooltip="Also replace the self-attention layers (as the paper does). Must match "
                                 "trained weights."),
                WEIGHTS.Input("weights", optional=True,
                              tooltip="Pack weights with trained MoA experts and routers (needed for 'learned')."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="The model with the MoA routing (a clone), for the sampler."),
                     ROUTER_MAPS.Output(display_name="router_maps",
                                        tooltip="Router maps captured while sampling, for Router Map Preview.")],
        )

    @classmethod
    def execute(cls, model, router: str, strength: float, id_strengths: str, start_percent: float,
                end_percent: float, mask_grow: int, mask_feather: int, self_attention: bool,
                weights: WeightFile | None = None) -> io.NodeOutput:
        binding = model.model_options.get("transformer_options", {}).get(OPTIONS_KEY)
        if binding is None:
            raise ValueError("model: no identities bound; connect the MODEL output of InstantFamily Apply")
        if binding.layout.n_ids == 0:
            raise ValueError("model: the stack holds no identities (person prompts only); MoA routes identities, "
                             "connect faces through Project IDs and Embedding Stack")
        if end_percent < start_percent:
            raise ValueError(f"end_percent {end_percent} is before start_percent {start_percent}")
        trained = weights is not None and bool(weights.group("moa"))
        if router == "learned" and not trained:
            raise ValueError("router: 'learned' needs pack weights with trained MoA layers (moa.* tensors); connect "
                             "them, or pick a training-free router (mask, prior, personalised)")
        config = MoAConfig(self_attention=self_attention)
        if trained:
            config = MoAConfig(self_attention=self_attention, router=config_from_tensors(weights.tensors).router)
        per_id = _parse_strengths(id_strengths, binding.layout.n_ids, 1.0) if id_strengths.strip() else None
        source = binding.masks.masks[0] if binding.masks.masks.shape[0] == 1 else binding.masks.masks
        router_masks = IDMasks(grow_and_feather(source, mask_grow, mask_feather), binding.masks.strength)
        sampling = model.get_model_object("model_sampling")
        capture = RouterCapture()
        moa = MoABinding(router, strength, per_id, float(sampling.percent_to_sigma(start_percent)),
                         float(sampling.percent_to_sigma(end_percent)), router_masks, capture)
        patched = patch_moa(model, moa, config, weights if trained else None)
        return io.NodeOutput(patched, RouterMaps(capture, router_masks.masks[0]))


class RouterMapPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyRouterMapPreview",
            display_name="InstantFamily Router Map Preview",
            category=CATEGORY,
            description="Where identity went: the personalised expert's share per latent pixel, one picture per "
            "resolution (largest first), averaged over layers and steps, in each ID's colour (white: no ID's "
            "mask; dark: the base model).",
            inputs=[
                ROUTER_MAPS.Input("router_maps", tooltip="From InstantFamily MoA."),
                io.Latent.Input("samples", tooltip="The sampler's output: makes the preview run after sampling and "
                                "sets its size."),
            ],
            outputs=[io.Image.Output(display_name="maps", tooltip="The router maps as images, in ID colours.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, router_maps: RouterMaps, samples: dict) -> io.NodeOutput:
        latent = samples["samples"]
        size = (int(latent.shape[-2]) * 8, int(latent.shape[-1]) * 8)
        images = render_router_maps(router_maps.capture.maps(), router_maps.masks, size)
        return io.NodeOutput(images, ui=ui.PreviewImage(images, cls=cls))

    @classmethod
    def fingerprint_inputs(cls, router_maps, samples) -> float:
        return float("nan")  # the capture changes in place with every sampling run: never cached


class MorphIDs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyMorphIDs",
            display_name="InstantFamily Morph IDs",
            category=CATEGORY,
            description="Subject morphing: ID index_a of ids_a moves towards ID index_b of ids_b (projected tokens, "
            "linear). alpha 0 = first person, 1 = second.",
            inputs=[
                IDS.Input("ids_a", tooltip="The stack to morph (its other IDs pass through)."),
                io.Int.Input("index_a", default=0, min=0, max=63, tooltip="Which ID of ids_a to morph."),
                IDS.Input("ids_b", tooltip="The stack holding the second person (may be ids_a again)."),
                io.Int.Input("index_b", default=0, min=0, max=63, tooltip="Which ID of ids_b to morph towards."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="0: person A, 1: person B."),
            ],
            outputs=[IDS.Output(display_name="ids",
                                tooltip="ids_a with ID index_a morphed towards ids_b's ID index_b.")],
        )

    @classmethod
    def execute(cls, ids_a: IDStack, index_a: int, ids_b: IDStack, index_b: int, alpha: float) -> io.NodeOutput:
        return io.NodeOutput(morph_tokens(ids_a, index_a, ids_b, index_b, alpha))


class MorphFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyMorphFaces",
            display_name="InstantFamily Morph Faces",
            category=CATEGORY,
            description="Subject morphing in face-feature space: face index_a of faces_a moves towards face "
            "index_b of faces_b (embedding: spherical, local map: linear); project the result with Project IDs.",
            inputs=[
                FACES.Input("faces_a", tooltip="The faces to morph (the others pass through)."),
                io.Int.Input("index_a", default=0, min=0, max=63, tooltip="Which face of faces_a to morph."),
                FACES.Input("faces_b", tooltip="The faces holding the second person."),
                io.Int.Input("index_b", default=0, min=0, max=63, tooltip="Which face of faces_b to morph towards."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="0: person A, 1: person B."),
            ],
            outputs=[FACES.Output(display_name="faces",
                                  tooltip="faces_a with face index_a morphed; project it with Project IDs.")],
        )

    @classmethod
    def execute(cls, faces_a, index_a: int, faces_b, index_b: int, alpha: float) -> io.NodeOutput:
        return io.NodeOutput(morph_faces(faces_a, index_a, faces_b, index_b, alpha))


NODES = [MoA, RouterMapPreview, MorphIDs, MorphFaces]
