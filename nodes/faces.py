"""Face encoding nodes: a face-encoder loader and an encode node (FACES + preview).

Only turns ComfyUI values into core calls and back; the work is in ``models/faces``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from comfy_api.latest import io

from ..models.faces.encode import encode_faces
from ..models.faces.types import merge_faces
from ..models.faces.image import as_image_list
from ..models.faces.insightface_backend import (DEFAULT_DET_SIZES, DEFAULT_MODEL, KNOWN_MODELS,
                                                InsightFaceEncoder, find_model_dir, list_model_names)
from ..models.faces.ordering import ORDERS, parse_index_list
from ..models.faces.preview import draw_faces
from ..models.faces.providers import PROVIDER_CHOICES
from .values import FACE_ENCODER, FACES, image_arrays, images_out


BACKENDS = ("insightface", "dlib")
CATEGORY = "InstantFamily/faces"


def insightface_roots() -> list[str]:
    """ComfyUI's models/insightface plus any 'insightface' paths from extra_model_paths.yaml."""
    import folder_paths

    roots = [os.path.join(folder_paths.models_dir, "insightface")]
    if "insightface" in folder_paths.folder_names_and_paths:
        roots += [p for p in folder_paths.get_folder_paths("insightface") if p not in roots]
    return roots


def cache_dir() -> str:
    """Where edited recognition graphs are cached (derived data, safe to delete)."""
    import folder_paths

    return os.path.join(folder_paths.models_dir, "instantfamily", "cache")


def _model_choices() -> list[str]:
    try:
        found = list_model_names(insightface_roots())
    except OSError:
        found = []
    return list(KNOWN_MODELS) + [m for m in found if m not in KNOWN_MODELS]


def parse_det_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(parse_index_list(text))
    except ValueError:
        raise ValueError(f"det_sizes: expected sizes like '640, 480, 320', got {text!r}") from None
    if not sizes or min(sizes) < 32:
        raise ValueError(f"det_sizes: expected sizes of at least 32 like '640, 480, 320', got {text!r}")
    return sizes


class FaceEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyFaceEncoderLoader",
            display_name="InstantFamily Face Encoder Loader (identity)",
            category=CATEGORY,
            description="Loads a face encoder. insightface (antelopev2/buffalo_l from "
            "models/insightface/models/<name>/) gives global and local identity features; dlib works "
            "offline with global features only (no local map).",
            inputs=[
                io.Combo.Input("backend", options=list(BACKENDS), default="insightface",
                               tooltip="insightface: global + local features (models needed). "
                               "dlib: offline, 128-d global embedding only."),
                io.Combo.Input("model_name", options=_model_choices(), default=DEFAULT_MODEL,
                               tooltip="insightface pack folder under models/insightface/models/ "
                               "(ignored by dlib)."),
                io.Combo.Input("provider", options=list(PROVIDER_CHOICES), default="auto",
                               tooltip="auto: CUDA when it works, else CPU."),
                io.String.Input("det_sizes", default=", ".join(str(s) for s in DEFAULT_DET_SIZES),
                                tooltip="Detection sizes tried in order until a face is found "
                                "(insightface; dlib tries upsampling 0 then 1)."),
            ],
            outputs=[FACE_ENCODER.Output(display_name="face_encoder", tooltip="For Encode Faces.")],
        )

    @classmethod
    def execute(cls, backend: str, model_name: str, provider: str, det_sizes: str) -> io.NodeOutput:
        if backend == "dlib":
            from ..models.faces.dlib_backend import DlibEncoder

            return io.NodeOutput(DlibEncoder())
        if backend != "insightface":
            raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        model_dir = find_model_dir(model_name, insightface_roots())
        encoder = InsightFaceEncoder(model_dir, provider=provider, det_sizes=parse_det_sizes(det_sizes),
                                     cache_dir=cache_dir(), name=model_name)
        return io.NodeOutput(encoder)


class EncodeFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyEncodeFaces",
            display_name="InstantFamily Encode Faces (identity photos)",
            category=CATEGORY,
            description="Detects, aligns and encodes faces; ID n is the n-th face (see the preview). "
            "One photo per person, one group photo, or both.",
            inputs=[
                FACE_ENCODER.Input("face_encoder", tooltip="From InstantFamily Face Encoder Loader."),
                io.Image.Input("images", tooltip="Photos; a batch counts as several images."),
                io.String.Input("faces_per_image", default="auto",
                                tooltip="auto: one image -> all faces, several -> the largest face of each. "
                                "Or '1', 'all', or one value per image such as '1, all, 1'."),
                io.Combo.Input("id_order", options=list(ORDERS), default="left_to_right",
                               tooltip="Which face becomes ID 0, 1, ... left_to_right: by image, then left to right. "
                               "size: by image, largest first. index_list: pick faces by their left-to-right number "
                               "(a list indexed by ID; the pose nodes' person_ids is the other way round)."),
                io.String.Input("index_list", default="",
                                tooltip="For id_order=index_list: e.g. '2, 0' makes face 2 ID 0 and face 0 ID 1."),
                io.Image.Input("images_2", optional=True, tooltip="More photos of another size (numbered after 'images')."),
                io.Image.Input("images_3", optional=True, tooltip="More photos (numbered after 'images_2')."),
                io.Image.Input("images_4", optional=True, tooltip="More photos (numbered after 'images_3')."),
            ],
            outputs=[FACES.Output(display_name="faces", tooltip="The identities, ID n = face n (numbered in the preview)."),
                     io.Image.Output(display_name="preview", tooltip="The photos with each face boxed and numbered "
                                     "in its ID colour.")],
        )

    @classmethod
    def execute(cls, face_encoder, images: torch.Tensor, faces_per_image: str, id_order: str, index_list: str,
                images_2: torch.Tensor | None = None, images_3: torch.Tensor | None = None,
                images_4: torch.Tensor | None = None) -> io.NodeOutput:
        import comfy.utils

        arrays: list[np.ndarray] = []
        for t in (images, images_2, images_3, images_4):
            if t is not None:
                arrays += image_arrays(t)
        rgb = as_image_list(arrays)
        bar = comfy.utils.ProgressBar(len(rgb))
        faces = encode_faces(face_encoder, rgb, faces_per_image=faces_per_image, order=id_order,
                             index_list=index_list, progress=lambda done, total: bar.update_absolute(done, total))
        preview = images_out(draw_faces(rgb, faces))
        return io.NodeOutput(faces, preview)


class MergeFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantFamilyMergeFaces",
            display_name="InstantFamily Merge Faces",
            category=CATEGORY,
            description="Joins FACES from several Encode Faces nodes, in order: faces_1's IDs first. "
            "For more people than one Encode Faces node takes photos, without resizing any photo.",
            inputs=[
                FACES.Input("faces_1", tooltip="These become the first IDs."),
                FACES.Input("faces_2", tooltip="These follow faces_1's IDs."),
                FACES.Input("faces_3", optional=True, tooltip="These follow faces_2's IDs."),
                FACES.Input("faces_4", optional=True, tooltip="These follow faces_3's IDs."),
            ],
            outputs=[FACES.Output(display_name="faces", tooltip="faces_1's IDs first, then faces_2's, ...")],
        )

    @classmethod
    def execute(cls, faces_1, faces_2, faces_3=None, faces_4=None) -> io.NodeOutput:
        return io.NodeOutput(merge_faces([f for f in (faces_1, faces_2, faces_3, faces_4) if f is not None]))


NODES = [FaceEncoderLoader, EncodeFaces, MergeFaces]
