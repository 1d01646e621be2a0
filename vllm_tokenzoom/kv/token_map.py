"""Per request: where every visual token sits in the prompt and in its video.

Index spaces (docs/architecture.md "Index spaces"):
- *visual index* ``v``: the v-th visual token of the prompt, after the pre-LLM stage, in
  position order over all its videos (every video's trailing newline excluded);
- *token position* ``p``: vLLM's (= RoPE position); ``positions[v]`` maps one to the other;
- *frame* and *cell*: where token ``v`` came from in video ``video[v]``: its frame, and its
  cell among that frame's ``cells[video]`` (row-major; 196 = 14 x 14 on LLaVA-OneVision),
  fed from the pre-LLM stage's plan for this request (``KeptTokens``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_tokenzoom.methods.base import KeptTokens


@dataclass(frozen=True)
class TokenMap:
    num_prompt_tokens: int
    positions: torch.Tensor  # [V] int64 token positions, ascending
    video: torch.Tensor  # [V] int64 the video (0-based, in prompt order)
    frame: torch.Tensor  # [V] int64, -1 when the pre-LLM plan is unknown
    cell: torch.Tensor  # [V] int64, -1 when unknown
    cells: tuple[int, ...]  # per video: cells per frame
    newlines: tuple[int, ...]  # per video: the position of its newline token
    pooled: tuple[int, ...] = ()  # per video: cells of its pooled overview grid, before its full grid (VOA)

    @property
    def num_visual(self) -> int:
        return self.positions.numel()

    @property
    def first_text_position(self) -> int:
        """The first prompt position after the last video (its newline)."""
        return self.newlines[-1] + 1 if self.newlines else self.num_prompt_tokens

    @classmethod
    def build(cls, num_prompt_tokens: int, spans: list[tuple[int, int]], kept: list[KeptTokens | None]) -> "TokenMap":
        """spans: per video in prompt order, (offset, length) of its placeholder run (tokens, then
        the newline); kept: per video, what the pre-LLM stage kept (None: not known)."""
        parts = []
        for i, ((offset, length), plan) in enumerate(zip(spans, kept, strict=True)):
            n = length - 1
            if plan is not None and len(plan) != n:
                raise ValueError(f"video {i}: {n} placeholder tokens but the pre-LLM plan kept {len(plan)}")
            unknown = torch.full((n,), -1, dtype=torch.int64)
            parts.append((torch.arange(offset, offset + n), torch.full((n,), i, dtype=torch.int64),
                          unknown if plan is None else plan.frame.cpu(), unknown if plan is None else plan.cell.cpu()))
        empty = torch.empty(0, dtype=torch.int64)
        cat = (lambda j: torch.cat([p[j] for p in parts])) if parts else (lambda j: empty)
        return cls(num_prompt_tokens, cat(0), cat(1), cat(2), cat(3),
                   tuple(-1 if k is None else k.cells for k in kept),
                   tuple(offset + length - 1 for offset, length in spans),
                   tuple(0 if k is None else k.pooled for k in kept))

    def frame_of(self, position: int) -> tuple[int, int, int] | None:
        """(video, frame, cell) of the token at ``position``, or None when it is not visual."""
        v = int(torch.searchsorted(self.positions, position))
        if v == self.num_visual or int(self.positions[v]) != position:
            return None
        return int(self.video[v]), int(self.frame[v]), int(self.cell[v])
