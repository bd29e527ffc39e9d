"""Errors that name the wrong input and say what to do (the CLI prints them without a traceback)."""
from __future__ import annotations


class EvaluationInputError(ValueError):
    """The user's evaluation inputs are wrong or incomplete (not a bug in the pack)."""
