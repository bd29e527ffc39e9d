"""Errors that tell the user which input is wrong and what to do about it."""
from __future__ import annotations


class FaceEncodingError(ValueError):
    """Base class: a problem with the user's images or models, not a bug in the pack."""


class NoFaceError(FaceEncodingError):
    """No (or too few) faces in one input image."""

    def __init__(self, message: str, image_index: int) -> None:
        super().__init__(message)
        self.image_index = image_index


class ModelFolderError(FaceEncodingError):
    """A model folder or file is missing; the message lists where we looked."""


class ModelFileError(FaceEncodingError):
    """A model file exists but cannot be used (corrupted, wrong kind of model)."""


class NoLocalFeaturesError(FaceEncodingError):
    """A step needs the local feature map but the encoder has none (dlib)."""
