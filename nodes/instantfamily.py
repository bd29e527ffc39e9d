"""The pack's main nodes: weights and ControlNet loaders, ID projection and stacks, and Apply.

Thin glue: ComfyUI values in, core calls (``models``, ``attention``) and ``nodes.patching`` out.
"""
from __future__ import annotations

import math
import os

import torch
from comfy_api.latest import io

from ..attention.masks import DEFAULT_MODE, MODES, IDMasks
from ..attention.layer import IdentityBinding
from ..models.id_stack import IDStack, load_id_stack, project_faces, save_id_stack
from ..models.projection import stack_context
from ..models.weights import WeightFile, load_weights
from ..pose.canvas import check_same_aspect
from .faces import FACES
from .patching import InstantFamilyControlNet, load_controlnet, patch_unet
from .values import file_fingerprint
from .prompts import PERSON_PROMPTS, PROMPTS_KEY, PersonPrompts, stacked_prompts

CATEGORY = "InstantFamily"
WEIGHTS = io.Custom("INSTANTFAMILY_WEIGHTS")
IDS = io.Custom("INSTANTFAMILY_IDS")
LAYOUT_KEY = "instantfamily_layout"
IDS_FOLDER = "ids"   # models/instantfamily/ids: saved ID stacks


def register_folders() -> None:
    """models/instantfamily for weights and ID stacks, keeping paths from extra_model_paths.yaml."""
    import folder_paths

    exts = set(folder_paths.supported_pt_extensions) | {".safetensors"}
    default = os.path.join(folder_paths.models_dir, "instantfamily")
    paths, old_exts = folder_paths.folder_names_and_paths.get("instantfamily", ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths["instantfamily"] = (paths, set(old_exts) | exts)


def _safetensors_files() -> list[str]:
    import folder_paths

    register_folders()
    return [f for f in folder_paths.get_filename_list("instantfamily") if f.endswith(".safetensors")]


def _weight_files() -> list[str]:
    return [f for f in _safetensors_files() if not f.startswith(IDS_FOLDER + "/")]


def _stack_files() -> list[str]:
    return [f for f in _safetensors_files() if f.startswith(IDS_FOLDER + "/")]


class WeightsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyWeightsLoader",
            display_name="InstantFamily Weights Loader",
            category=CATEGORY,
            description="Loads the pack's trained tensors (ID projection, ...) from models/instantfamily.",
            inputs=[io.Combo.Input("weights_name", options=_weight_files(),
                                   tooltip="A .safetensors file in models/instantfamily (or an extra path).")],
            outputs=[WEIGHTS.Output(display_name="weights", tooltip="For Project IDs, Embedding Stack and Apply.")],
        )

    @classmethod
    def fingerprint_inputs(cls, weights_name: str) -> str:
        """Rerun when the file under this name changes (e.g. a newly exported checkpoint)."""
        import folder_paths

        register_folders()
        return file_fingerprint(folder_paths.get_full_path("instantfamily", weights_name) or weights_name)

    @classmethod
    def execute(cls, weights_name: str) -> io.NodeOutput:
        import folder_paths

        register_folders()
        path = folder_paths.get_full_path("instantfamily", weights_name)
        if path is None:
            raise ValueError(f"weights_name: {weights_name!r} not found in models/instantfamily")
        return io.NodeOutput(load_weights(path, expect={"d_k": 768}))


class ControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="InstantFamilyControlNetLoader",
            display_name="InstantFamily ControlNet Loader",
            category=CATEGORY,
            description="Loads an SD1.5 ControlNet whose cross-attention runs InstantFamily's masked "
            "attention. Works with the core Apply ControlNet node too.",
            inputs=[io.Combo.Input("control_net_name", options=folder_paths.get_filename_list("controlnet"),
                                   tooltip="An SD1.5 OpenPose ControlNet from models/controlnet.")],
            outputs=[io.ControlNet.Output(display_name="control_net", tooltip="For InstantFamily Apply (or core Apply ControlNet).")],
        )

    @classmethod
    def execute(cls, control_net_name: str) -> io.NodeOutput:
        import folder_paths

        return io.NodeOutput(load_controlnet(folder_paths.get_full_path_or_raise("controlnet", control_net_name)))


class ProjectIDs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyProjectIDs",
            display_name="InstantFamily Project IDs (identity tokens)",
            category=CATEGORY,
            description="Turns encoded faces into ID tokens (L*L+1 per face) with the pack's projection.",
            inputs=[FACES.Input("faces", tooltip="From InstantFamily Encode Faces (insightface: needs local features)."),
                    WEIGHTS.Input("weights", tooltip="From InstantFamily Weights Loader.")],
            outputs=[IDS.Output(display_name="ids", tooltip="Projected identity tokens, one block per ID, for the Embedding Stack.")],
        )

    @classmethod
    def execute(cls, faces, weights: WeightFile) -> io.NodeOutput:
        return io.NodeOutput(project_faces(faces, weights.projection(), weights.meta.face_encoder))


class SaveIDStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilySaveIDStack",
            display_name="InstantFamily Save ID Stack",
            category=CATEGORY,
            description="Saves projected IDs to models/instantfamily/ids/<name>.safetensors: encode a family once.",
            inputs=[IDS.Input("ids", tooltip="From Project IDs."), io.String.Input("name", default="family", tooltip="File name without extension.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ids: IDStack, name: str) -> io.NodeOutput:
        import folder_paths

        if not name or any(c in name for c in "/\\:") or name.startswith("."):
            raise ValueError(f"name: {name!r} must be a plain file name")
        folder = os.path.join(folder_paths.models_dir, "instantfamily", IDS_FOLDER)
        os.makedirs(folder, exist_ok=True)
        save_id_stack(os.path.join(folder, f"{name}.safetensors"), ids)
        return io.NodeOutput()


class LoadIDStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyLoadIDStack",
            display_name="InstantFamily Load ID Stack",
            category=CATEGORY,
            description="Loads IDs saved by Save ID Stack.",
            inputs=[io.Combo.Input("stack_name", options=_stack_files(),
                                   tooltip="A saved stack in models/instantfamily/ids.")],
            outputs=[IDS.Output(display_name="ids", tooltip="Projected identity tokens, one block per ID, for the Embedding Stack.")],
        )

    @classmethod
    def fingerprint_inputs(cls, stack_name: str) -> str:
        """Rerun when Save ID Stack (or anything) rewrites the file under this name."""
        import folder_paths

        register_folders()
        return file_fingerprint(folder_paths.get_full_path("instantfamily", stack_name) or stack_name)

    @classmethod
    def execute(cls, stack_name: str) -> io.NodeOutput:
        import folder_paths

        register_folders()
        return io.NodeOutput(load_id_stack(folder_paths.get_full_path_or_raise("instantfamily", stack_name)))


def _repeat_text(cond: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a text context to ``length`` tokens, as ComfyUI does when it batches two lengths."""
    return cond.repeat(1, length // cond.shape[1], 1)


def _stack(conditioning: list, ids: torch.Tensor, text_len: int, prompts: list | None = None,
           person_prompts: PersonPrompts | None = None) -> tuple[list, object]:
    out, layout = [], None
    for cond, extra in conditioning:
        if LAYOUT_KEY in extra:
            raise ValueError("conditioning already carries an identity stack; stack IDs once")
        if cond.shape[-1] != ids.shape[-1]:
            raise ValueError(f"conditioning width {cond.shape[-1]} != ID token width {ids.shape[-1]}: "
                             "InstantFamily supports SD1.5 text encoders (768) only")
        context, layout = stack_context(_repeat_text(cond, text_len), ids.to(cond), prompts)
        extra = {**extra, LAYOUT_KEY: layout, "cross_attn_controlnet": context}
        if person_prompts is not None:
            extra[PROMPTS_KEY] = person_prompts
        out.append([context, extra])
    return out, layout


class EmbeddingStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyEmbeddingStack",
            display_name="InstantFamily Embedding Stack",
            category=CATEGORY,
            description="Stacks [text ; ID 1 ; ... ; ID N] (eq. 4-5). The negative gets null IDs with the "
            "same layout, so cond and uncond run in one batched pass.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt (CLIP Text Encode); IDs are stacked after its tokens."),
                io.Conditioning.Input("negative", tooltip="The negative prompt; gets null IDs with the same layout."),
                IDS.Input("ids", tooltip="From Project IDs or Load ID Stack; ID n is masked by mask n."),
                WEIGHTS.Input("weights", tooltip="The same weights that projected the IDs (for the null ID)."),
                PERSON_PROMPTS.Input("person_prompts", optional=True,
                                     tooltip="Optional, from Person Prompts: one prompt per person, each visible only "
                                             "in that person's region; the negative gets empty ones."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="[text ; ID 1 ; ... ; ID N], for Apply."),
                     io.Conditioning.Output(display_name="negative", tooltip="Text with null IDs (same layout), for Apply.")],
        )

    @classmethod
    def execute(cls, positive: list, negative: list, ids: IDStack, weights: WeightFile,
                person_prompts: PersonPrompts | None = None) -> io.NodeOutput:
        if ids.face_encoder and ids.face_encoder != weights.meta.face_encoder:
            raise ValueError(f"ids were projected for {ids.face_encoder!r} but the weights are for "
                             f"{weights.meta.face_encoder!r}")
        if ids.tokens_per_id != weights.meta.projection_config.tokens_per_id:
            raise ValueError(f"ids have {ids.tokens_per_id} tokens per ID, the weights make "
                             f"{weights.meta.projection_config.tokens_per_id}")
        # One text length for all, so cond and uncond share a layout and batch together.
        text_len = math.lcm(*(c.shape[1] for c, _ in positive + negative))
        null = weights.projection().null_tokens(len(ids)).detach()
        pp = person_prompts
        pos, layout = _stack(positive, ids.tokens, text_len, pp.positive() if pp is not None else None, pp)
        neg, null_layout = _stack(negative, null, text_len, pp.negative() if pp is not None else None, pp)
        assert layout == null_layout
        return io.NodeOutput(pos, neg)


def _parse_strengths(text: str, n: int, scale: float) -> list[float]:
    text = text.strip()
    if not text:
        return [scale] * n
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"id_strengths: {text!r} must be numbers separated by commas, e.g. '1, 1, 0.8'") from None
    if len(values) != n:
        raise ValueError(f"id_strengths: {len(values)} values given for {n} IDs; give one per ID or leave empty")
    return [v * scale for v in values]


class Apply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyApply",
            display_name="InstantFamily Apply (multi person identity)",
            category=CATEGORY,
            description="Patches every cross-attention of the SD1.5 UNet (and of the pack's ControlNet) so "
            "the tokens of ID n act only inside mask n.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model; it is cloned, never modified."),
                io.Conditioning.Input("positive", tooltip="From InstantFamily Embedding Stack."),
                io.Conditioning.Input("negative", tooltip="From InstantFamily Embedding Stack."),
                io.Mask.Input("masks", tooltip="One mask per ID, in ID order (e.g. from the ID masks node)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Scales every ID: 0 off, 1 neutral, >1 emphasis."),
                io.String.Input("id_strengths", default="", tooltip="Optional per-ID strengths, e.g. '1, 1, 0.7'."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="When in sampling the IDs start to act."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="When in sampling the IDs stop acting."),
                io.Combo.Input("attention_mode", options=["from weights", *MODES], default="from weights",
                               tooltip="hard: masked IDs get no attention. paper: eq. 6 literally. "
                               "'from weights' uses the mode the weights were trained with."),
                WEIGHTS.Input("weights", optional=True, tooltip="For 'from weights' (default: hard)."),
                io.ControlNet.Input("control_net", optional=True,
                                    tooltip="A ControlNet from InstantFamily ControlNet Loader."),
                io.Image.Input("image", optional=True, tooltip="The control image (pose with ID circles)."),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="ControlNet strength (as in Apply ControlNet)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched model (a clone), for the sampler."),
                     io.Conditioning.Output(display_name="positive", tooltip="With the control image applied, for the sampler."),
                     io.Conditioning.Output(display_name="negative", tooltip="With the control image applied, for the sampler.")],
        )

    @classmethod
    def execute(cls, model, positive: list, negative: list, masks: torch.Tensor, strength: float,
                id_strengths: str, start_percent: float, end_percent: float, attention_mode: str,
                weights: WeightFile | None = None, control_net=None, image: torch.Tensor | None = None,
                control_strength: float = 1.0) -> io.NodeOutput:
        layouts = {extra.get(LAYOUT_KEY) for _, extra in positive + negative}
        if None in layouts:
            raise ValueError("positive/negative: no identity stack; connect both through InstantFamily Embedding Stack")
        if len(layouts) != 1:
            raise ValueError("positive and negative carry different identity layouts; stack them in one node")
        layout = layouts.pop()
        if masks.ndim == 2:
            masks = masks.unsqueeze(0)
        if masks.shape[0] != layout.n_ids:
            raise ValueError(f"masks: {masks.shape[0]} masks for {layout.n_ids} IDs; give exactly one mask per ID "
                             "in ID order")
        if end_percent < start_percent:
            raise ValueError(f"end_percent {end_percent} is before start_percent {start_percent}")
        mode = attention_mode
        if mode == "from weights":
            mode = weights.meta.attention_mode if weights is not None else DEFAULT_MODE
        sampling = model.get_model_object("model_sampling")
        pp = stacked_prompts(positive + negative)
        binding = IdentityBinding(
            layout, IDMasks(masks.float().cpu(), _parse_strengths(id_strengths, layout.n_ids, strength),
                            pp.regions if pp is not None else None,
                            pp.region_strength() if pp is not None else None), mode,
            sigma_start=float(sampling.percent_to_sigma(start_percent)),
            sigma_end=float(sampling.percent_to_sigma(end_percent)),
        )
        patched = patch_unet(model, binding)
        if control_net is not None:
            if not isinstance(control_net, InstantFamilyControlNet):
                raise ValueError("control_net: masked ControlNet attention needs a ControlNet loaded with "
                                 "InstantFamily ControlNet Loader")
            if image is None:
                raise ValueError("image: a control_net was given without its control image")
            # ComfyUI centre-crops the control image to the latent while the masks are scaled: with
            # another aspect the pose and the masks would no longer cover the same people.
            check_same_aspect(tuple(masks.shape[-2:]), tuple(image.shape[1:3]), "masks", "image",
                              "Make the control image and the masks at the same size (one Pose Control node "
                              "gives both)")
            import nodes

            positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
                positive, negative, control_net, image, control_strength, start_percent, end_percent)
        return io.NodeOutput(patched, positive, negative)


register_folders()

NODES = [WeightsLoader, ControlNetLoader, ProjectIDs, SaveIDStack, LoadIDStack, EmbeddingStack, Apply]
