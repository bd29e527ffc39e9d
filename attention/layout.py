"""How a cross-attention context is laid out:
[text ; ID 0 ; ... ; ID N-1 ; prompt of person 0 ; ... ; prompt of person P-1].

Every module that slices a context or builds a mask asks a ``TokenLayout``; nobody else computes
offsets. Each identity occupies one contiguous block: its ``tokens_per_id`` face tokens (the global
token, then the L*L local tokens) followed by ``extra_per_id`` further tokens that share its face mask.

Per-person prompts (``prompt_lens``, one entry per person, 0 for a person without a prompt) come after
all ID blocks, so the ID part keeps the layout the projection was trained with. Person p < n_ids is
the person of ID p; persons p >= n_ids have a prompt but no identity (someone in the pose without a
photo). Each block of tokens is a *token group* with its own mask: ID n's tokens use face mask n,
person p's prompt tokens use region mask p (the person's body region, wider than the face).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

TEXT_CHUNK = 77  # CLIP's window; long prompts come as 154, 231, ...


class TokenGroup(NamedTuple):
    """A contiguous block of non-text tokens that one mask governs.

    kind: "id" (face mask ``index``) or "prompt" (region mask ``index``); tokens: its context slice."""

    kind: str
    index: int
    tokens: slice

    @property
    def length(self) -> int:
        return self.tokens.stop - self.tokens.start


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TokenLayout:
    """Frozen and hashable, so it can key caches."""

    text_len: int
    n_ids: int
    tokens_per_id: int
    extra_per_id: int = 0
    prompt_lens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("text_len", "n_ids", "tokens_per_id", "extra_per_id"):
            value = getattr(self, name)
            if not _is_count(value):
                raise ValueError(f"TokenLayout.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.prompt_lens, (tuple, list)) or not all(_is_count(v) for v in self.prompt_lens):
            raise ValueError("TokenLayout.prompt_lens must be a sequence of non-negative ints (one per "
                             f"person, 0 for no prompt), got {self.prompt_lens!r}")
        object.__setattr__(self, "prompt_lens", tuple(self.prompt_lens))
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
    def n_prompts(self) -> int:
        """Prompt slots (persons), including those whose prompt is empty."""
        return len(self.prompt_lens)

    @property
    def has_prompts(self) -> bool:
        return sum(self.prompt_lens) > 0

    @property
    def total(self) -> int:
        return self.text_len + self.n_ids * self.id_width + sum(self.prompt_lens)

    @property
    def text_slice(self) -> slice:
        return slice(0, self.text_len)

    @property
    def ids_slice(self) -> slice:
        """All ID blocks (face and extra tokens), without the per-person prompts."""
        return slice(self.text_len, self.text_len + self.n_ids * self.id_width)

    def prompt_slice(self, p: int) -> slice:
        """Prompt tokens of person ``p`` (empty when that person has no prompt)."""
        if not 0 <= p < self.n_prompts:
            raise IndexError(f"person {p} out of range for a layout with {self.n_prompts} person prompts")
        start = self.ids_slice.stop + sum(self.prompt_lens[:p])
        return slice(start, start + self.prompt_lens[p])

    @cached_property
    def groups(self) -> tuple[TokenGroup, ...]:
        """Every non-empty token group after the text, in context order: IDs, then person prompts."""
        ids = [TokenGroup("id", n, self.id_slice(n)) for n in range(self.n_ids)]
        prompts = [TokenGroup("prompt", p, self.prompt_slice(p)) for p in range(self.n_prompts)
                   if self.prompt_lens[p]]
        return tuple(ids + prompts)

    def id_slice(self, n: int) -> slice:
        """Tokens of identity ``n`` (face tokens and its extra tokens)."""
        if not 0 <= n < self.n_ids:
            raise IndexError(f"identity {n} out of range for a layout with {self.n_ids} IDs")
        start = self.text_len + n * self.id_width
        return slice(start, start + self.id_width)

    @cached_property
    def owner(self) -> torch.Tensor:
        """(total,) long: -1 for text tokens, n for the tokens of identity n and of person n's prompt."""
        ids = torch.arange(self.n_ids).repeat_interleave(self.id_width)
        prompts = torch.arange(self.n_prompts).repeat_interleave(torch.tensor(self.prompt_lens, dtype=torch.long))
        return torch.cat([torch.full((self.text_len,), -1, dtype=torch.long), ids, prompts])

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
        """(text tokens, [tokens of ID 0, ..., ID N-1]) along dim -2 (person prompts: ``prompt_slice``)."""
        self.check_context(context)
        return context[..., self.text_slice, :], [context[..., self.id_slice(n), :] for n in range(self.n_ids)]

    def describe(self) -> str:
        extra = f" + {self.extra_per_id} extra" if self.extra_per_id else ""
        prompts = f" + person prompts {list(self.prompt_lens)}" if self.prompt_lens else ""
        return f"{self.text_len} text + {self.n_ids} IDs x ({self.tokens_per_id}{extra}) tokens{prompts}"
