"""Face detection, alignment and identity features (ComfyUI-free).

Backends: :class:`InsightFaceEncoder` (global embedding + local feature map) and :class:`DlibEncoder`
(offline; global embedding only). :func:`encode_faces` turns photos into a :class:`Faces` value.
Backends are imported lazily: onnx/insightface/dlib are only needed by the backend you use.
"""
from .errors import (FaceEncodingError, ModelFileError, ModelFolderError, NoFaceError,
                     NoLocalFeaturesError)
from .types import Face, Faces, merge_faces

__all__ = [
    "Face", "Faces", "merge_faces", "FaceEncodingError", "ModelFileError", "ModelFolderError", "NoFaceError",
    "NoLocalFeaturesError", "encode_faces", "require_local", "cosine_similarity",
    "InsightFaceEncoder", "DlibEncoder", "draw_faces",
]


def __getattr__(name: str):
    if name in ("encode_faces", "require_local", "cosine_similarity"):
        from . import encode

        return getattr(encode, name)
    if name == "InsightFaceEncoder":
        from .insightface_backend import InsightFaceEncoder

        return InsightFaceEncoder
    if name == "DlibEncoder":
        from .dlib_backend import DlibEncoder

        return DlibEncoder
    if name == "draw_faces":
        from .preview import draw_faces

        return draw_faces
    raise AttributeError(name)
