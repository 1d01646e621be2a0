"""Pre-LLM baselines at a chosen visual-token budget (issue #4's accuracy comparisons).

Each keeps about ``keep_ratio`` of a video's ``T * N`` visual tokens before the LLM, with
the same interface as TTM (``PreLLMPolicy``: ``num_kept_tokens`` from counts only, ``apply`` on
the per-frame tokens), so a method and a baseline at the same budget differ only in *which*
tokens they keep:
- ``random_drop``: a uniformly random subset of all tokens (content-blind; the same
  subset for every video of the same shape, from ``seed``);
- ``frame_sampling``: whole frames, uniformly spaced in time (what sampling fewer frames gives);
- ``spatial_pool``: every frame average-pooled from its ``s x s`` grid to a smaller grid
  (new tokens, not a subset of the old ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.base import KeptTokens, PreLLMPolicy


def _check_ratio(keep_ratio: float) -> None:
    if not 0.0 < keep_ratio <= 1.0:
        raise TokenZoomConfigError(f"keep_ratio = {keep_ratio!r} is out of range; allowed: 0.0 < keep_ratio <= 1.0")


@dataclass(frozen=True)
class RandomDrop(PreLLMPolicy):
    """Keep ``max(1, round(keep_ratio * T * N))`` tokens chosen at random, in their original order."""

    keep_ratio: float = 0.3
    seed: int = 0

    def __post_init__(self):
        _check_ratio(self.keep_ratio)

    def num_kept_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return max(1, round(self.keep_ratio * num_frames * tokens_per_frame))

    def plan(self, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        """-> [K] int64 visual indices ``frame * N + spatial``, ascending."""
        gen = torch.Generator().manual_seed(self.seed)
        total = num_frames * tokens_per_frame
        return torch.randperm(total, generator=gen)[: self.num_kept_tokens(num_frames, tokens_per_frame)].sort().values

    def apply(self, frames: torch.Tensor) -> tuple[torch.Tensor, KeptTokens]:
        """frames: [T, N, D] -> (kept tokens [K, D], their frames and cells)."""
        kept = self.plan(frames.shape[0], frames.shape[1]).to(frames.device)
        return frames.flatten(0, 1)[kept], KeptTokens.from_source(kept, frames.shape[1])


@dataclass(frozen=True)
class FrameSampling(PreLLMPolicy):
    """Keep ``max(1, round(keep_ratio * T))`` whole frames, uniformly spaced from first to last."""

    keep_ratio: float = 0.3

    def __post_init__(self):
        _check_ratio(self.keep_ratio)

    def frames_kept(self, num_frames: int) -> torch.Tensor:
        count = max(1, round(self.keep_ratio * num_frames))
        return torch.linspace(0, num_frames - 1, count).round().to(torch.int64)  # [F], distinct as count <= T

    def num_kept_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return len(self.frames_kept(num_frames)) * tokens_per_frame

    def apply(self, frames: torch.Tensor) -> tuple[torch.Tensor, KeptTokens]:
        num_frames, n, _ = frames.shape
        kept = (self.frames_kept(num_frames)[:, None] * n + torch.arange(n)).flatten().to(frames.device)  # [F * N]
        return frames.flatten(0, 1)[kept], KeptTokens.from_source(kept, n)


@dataclass(frozen=True)
class SpatialPool(PreLLMPolicy):
    """Average-pool each frame's square grid of ``N`` tokens to ``g x g``, ``g = max(1, round(sqrt(N * keep_ratio)))``."""

    keep_ratio: float = 0.25

    def __post_init__(self):
        _check_ratio(self.keep_ratio)

    def grid(self, tokens_per_frame: int) -> int:
        return max(1, round(math.sqrt(tokens_per_frame * self.keep_ratio)))

    def num_kept_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return num_frames * self.grid(tokens_per_frame) ** 2

    def apply(self, frames: torch.Tensor) -> tuple[torch.Tensor, KeptTokens]:
        """frames: [T, N, D] -> (pooled tokens [T * g * g, D], each frame's g x g new cells)."""
        num_frames, n, dim = frames.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"spatial_pool needs a square grid of tokens per frame, got {n}")
        grid = frames.transpose(1, 2).reshape(num_frames, dim, side, side)  # [T, D, s, s]
        g = self.grid(n)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, g)  # [T, D, g, g]
        return pooled.flatten(2).transpose(1, 2).flatten(0, 1), KeptTokens.every(num_frames, g * g, frames.device)
