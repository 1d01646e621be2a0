"""Token temporal merging (TTM): DyCoke stage 1 (DyCoke §3.2(1), arXiv 2411.15024).

Frames are taken in sliding windows of 4. In a window ``[f0, f1, f2, f3]`` the first
frame is kept whole; every other frame keeps only its ``int((1 - K) * N)`` tokens that
are *least* similar (cosine, same spatial position) to a reference frame, and drops the
rest: ``f1`` and ``f2`` against ``f0``, ``f3`` against ``f2``. Dropped tokens never
reach the LLM, so they never take KV memory.

Two variants (``variant``):
- ``"paper"`` (default), the paper's intent: every window is processed, the last
  (partial) one too; any frame count >= 1 works; kept tokens keep their spatial order.
- ``"official"``, the kept-token *counts* of the official code (KD-TAO/DyCoke,
  ``llava_arch.py:dycole_ttm``) so published numbers can be compared: its stage-2 loop
  ``range(0, T - 4, 4)`` skips the last window (``f2`` stays whole there), and with an
  odd frame count the last frame is dropped. Where the official code crashes
  (T <= 4), the same rules apply with no stage-2 window; a single frame is kept whole.
  Kept tokens keep their spatial order here too (the official code orders them by
  similarity, which changes no count).

Index space: the plan is a list of *source indices* ``frame * N + cell``, into the
video's unpruned ``T * N`` tokens (the trailing newline token is not part of it);
:meth:`TTM.apply` returns them as frames and cells (``KeptTokens``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_tokenzoom.methods.base import KeptTokens, PreLLMPolicy, check_choice, check_ratio

VARIANTS = ("paper", "official")


@dataclass(frozen=True)
class TTM(PreLLMPolicy):
    """Settings of TTM.

    Parameters
    ----------
    prune_ratio : float
        ``K``: the fraction of tokens dropped in each non-pivot frame, ``0 <= K < 1``.
    variant : str
        ``"paper"`` or ``"official"`` (see the module docstring).
    """

    prune_ratio: float = 0.7
    variant: str = "paper"

    def __post_init__(self):
        check_ratio("prune_ratio", self.prune_ratio)
        check_choice("variant", self.variant, VARIANTS)

    def tokens_kept_per_pruned_frame(self, tokens_per_frame: int) -> int:
        return int((1.0 - self.prune_ratio) * tokens_per_frame)

    def frame_plan(self, num_frames: int) -> list[tuple[int, int | None]]:
        """``(frame, reference)`` for every frame that reaches the LLM, in temporal order.

        ``reference is None``: the frame is kept whole; otherwise it is pruned against
        ``reference``. Frames not listed are dropped entirely (official variant only).
        """
        if num_frames < 1:
            raise ValueError(f"TTM needs at least one frame, got {num_frames}")
        if self.variant == "paper":
            return [(f, _paper_reference(f)) for f in range(num_frames)]
        return _official_frame_plan(num_frames)

    def num_kept_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        """How many visual tokens survive: a function of counts only, never of content."""
        keep = self.tokens_kept_per_pruned_frame(tokens_per_frame)
        return sum(tokens_per_frame if ref is None else keep for _, ref in self.frame_plan(num_frames))

    def plan(self, frames: torch.Tensor) -> torch.Tensor:
        """Choose the visual tokens that survive.

        frames: [T, N, D] per-frame visual tokens (projector output after pooling).
        returns: [num_kept_tokens(T, N)] int64 source indices ``frame * N + cell``, on
            ``frames.device``, frame by frame in temporal order, spatial order kept inside a frame.
        """
        num_frames, n, _ = frames.shape
        plan = self.frame_plan(num_frames)
        pruned, sim = self.similarities(frames)
        kept_spatial: dict[int, torch.Tensor] = {}
        if pruned:
            keep = self.tokens_kept_per_pruned_frame(n)
            # the `keep` least similar tokens (stable, so ties resolve by position), in spatial order
            chosen = torch.argsort(sim, dim=-1, stable=True)[:, :keep].sort(dim=-1).values  # [P, keep]
            kept_spatial = {f: chosen[i] for i, f in enumerate(pruned)}
        every = torch.arange(n, device=frames.device)
        parts = [f * n + kept_spatial.get(f, every) for f, _ in plan]
        return torch.cat(parts).to(torch.int64)

    def similarities(self, frames: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """frames: [T, N, D] -> (the pruned frames, [P, N] the cosine similarity of each of their
        tokens to the token at the same position in its reference frame; a frame keeps its
        ``tokens_kept_per_pruned_frame`` least similar)."""
        pruned = [(f, ref) for f, ref in self.frame_plan(frames.shape[0]) if ref is not None]
        if not pruned:
            return [], frames.new_empty((0, frames.shape[1]))
        frame_ids = torch.tensor([f for f, _ in pruned], device=frames.device)
        ref_ids = torch.tensor([r for _, r in pruned], device=frames.device)
        sim = torch.nn.functional.cosine_similarity(frames[frame_ids].float(), frames[ref_ids].float(), dim=-1)
        return [f for f, _ in pruned], sim

    def apply(self, frames: torch.Tensor) -> tuple[torch.Tensor, KeptTokens]:
        """frames: [T, N, D] -> (kept tokens [K, D], their frames and cells)."""
        kept = self.plan(frames)
        return frames.flatten(0, 1)[kept], KeptTokens.from_source(kept, frames.shape[1])


def _paper_reference(frame: int) -> int | None:
    offset = frame % 4
    start = frame - offset
    return (None, start, start, start + 2)[offset]


def _official_frame_plan(num_frames: int) -> list[tuple[int, int | None]]:
    if num_frames == 1:
        return [(0, None)]
    reference: dict[int, int | None] = {}
    for i in range(0, num_frames - 1, 2):  # stage 1: pairs; an odd last frame is never listed
        reference[i], reference[i + 1] = None, i
    for i in range(0, num_frames - 4, 4):  # stage 2: the last window is skipped
        reference[i + 2] = i
    return sorted(reference.items())
