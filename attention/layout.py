"""How a cross-attention context is laid out: [text ; ID 0 ; ID 1 ; ... ; ID N-1].

Every module that slices a context or builds a mask asks a ``TokenLayout``; nobody else computes
offsets. Each identity occupies one contiguous block: its ``tokens_per_id`` face tokens (the global
token, then the L*L local tokens) followed by ``extra_per_id`` tokens reserved for per-person prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

TEXT_CHUNK = 77  # CLIP's window; long prompts come as 154, 231, ...


@dataclass(frozen=True)
class TokenLayout:
    """Frozen and hashable, so it can key caches."""

    text_len: int
    n_ids: int
    tokens_per_id: int
    extra_per_id: int = 0

    def __post_init__(self) -> None:
        for name in ("text_len", "n_ids", "tokens_per_id", "extra_per_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TokenLayout.{name} must be a non-negative int, got {value!r}")
        if self.text_len == 0:
            raise ValueError("TokenLayout.text_len must be >= 1: text tokens keep every pixel's "
                             "attention row non-empty")
        if self.n_ids > 0 and self.tokens_per_id == 0:
            raise ValueError("TokenLayout.tokens_per_id must be >= 1 when n_ids > 0")

    @classmethod
    def for_face_grid(cls, text_len: int, n_ids: int, side: int, extra_per_id: int = 0) -> "TokenLayout":
        """Layout for a face encoder whose local map is side x side: L*L + 1 tokens per ID."""
        return cls(text_len, n_ids, side * side + 1, extra_per_id)

    @property
    def id_width(self) -> int:
        """Tokens one identity occupies, extra tokens included."""
        return self.tokens_per_id + self.extra_per_id

    @property
    def total(self) -> int:
        return self.text_len + self.n_ids * self.id_width

    @property
    def text_slice(self) -> slice:
        return slice(0, self.text_len)

    @property
    def ids_slice(self) -> slice:
        return slice(self.text_len, self.total)

    def id_slice(self, n: int) -> slice:
        """Tokens of identity ``n`` (face tokens and its extra tokens)."""
        if not 0 <= n < self.n_ids:
            raise IndexError(f"identity {n} out of range for a layout with {self.n_ids} IDs")
        start = self.text_len + n * self.id_width
        return slice(start, start + self.id_width)

    @cached_property
    def owner(self) -> torch.Tensor:
        """(total,) long: -1 for text tokens, n for the tokens of identity n."""
        ids = torch.arange(self.n_ids).repeat_interleave(self.id_width)
        return torch.cat([torch.full((self.text_len,), -1, dtype=torch.long), ids])

    def check_context(self, context: torch.Tensor, name: str = "context") -> None:
        """Raise a clear error when ``context``'s token axis (dim -2) does not match this layout."""
        if context.ndim < 2:
            raise ValueError(f"{name} must be [..., tokens, width], got shape {tuple(context.shape)}")
        if context.shape[-2] != self.total:
            raise ValueError(
                f"{name} has {context.shape[-2]} tokens but the layout expects {self.total} "
                f"({self.describe()}). The context was built for another layout, or the host "
                "repeated or truncated it; rebuild the stack for this prompt and these IDs."
            )

    def split(self, context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(text tokens, [tokens of ID 0, ..., ID N-1]) along dim -2."""
        self.check_context(context)
        return context[..., self.text_slice, :], [context[..., self.id_slice(n), :] for n in range(self.n_ids)]

    def describe(self) -> str:
        extra = f" + {self.extra_per_id} extra" if self.extra_per_id else ""
        return f"{self.text_len} text + {self.n_ids} IDs x ({self.tokens_per_id}{extra}) tokens"
