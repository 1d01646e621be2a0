"""Where a request's tokens live in each layer's KV cache once prefill policies dropped rows.

A *segment* is a run of layers in which the same visual tokens are alive (a new one
starts after every death layer). In segment ``s`` the request's tokens are stored
*compacted*: the alive tokens, in position order, at *cache indices* ``0, 1, 2, ...``
(slot = ``block_table[c // B] * B + c % B``, the request's own blocks, shared by every
layer). So vLLM's stock kernels run the later layers over a shorter sequence: fewer rows,
shorter KV, and a dropped token is neither written nor read there. In segment 0 every
token is alive and the cache index is the position. A generated token at position
``p >= N`` has cache index ``alive_prompt_tokens + p - N`` in every segment.

Index spaces: *token position* ``p`` and *cache index* ``c <= p`` (per segment); visual
tokens are named by visual index ``v`` (``kv/token_map.py``). Host tensors: they size
the batch and the attention metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from vllm_tokenzoom.kv.token_map import TokenMap


@dataclass(frozen=True, eq=False)
class Segment:
    first_layer: int
    num_prompt_tokens: int
    alive_visual: torch.Tensor  # [V] bool
    visual_positions: torch.Tensor  # [V] int64

    @cached_property
    def compacted(self) -> bool:
        return not bool(self.alive_visual.all())

    @cached_property
    def _rank(self) -> torch.Tensor:
        """[N + 1]: cache indices of prompt positions (-1: dead), then the alive prompt count."""
        alive = torch.ones(self.num_prompt_tokens, dtype=torch.bool)
        alive[self.visual_positions[~self.alive_visual]] = False
        rank = torch.cumsum(alive, 0) - 1
        rank[~alive] = -1
        return torch.cat((rank, alive.sum().view(1)))

    @cached_property
    def alive_prompt_tokens(self) -> int:
        return int(self._rank[-1]) if self.compacted else self.num_prompt_tokens

    def cache_index(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [n] int64 -> [n] int64 cache indices (-1: not alive in this segment)."""
        if not self.compacted:
            return positions
        n = self.num_prompt_tokens
        prompt = self._rank[positions.clamp(max=n - 1)]
        return torch.where(positions < n, prompt, positions - n + self.alive_prompt_tokens)

    def generated_index(self, position: int) -> int:
        """The cache index of a generated token's position (``>=`` the prompt length): plain
        arithmetic, no tensor (the decode hot path)."""
        return position - self.num_prompt_tokens + self.alive_prompt_tokens

    def cache_len(self, num_positions: int) -> int:
        """How many of positions ``0..num_positions - 1`` are alive (the segment's sequence length)."""
        if not self.compacted:
            return num_positions
        n = self.num_prompt_tokens
        if num_positions > n:
            return self.alive_prompt_tokens + num_positions - n
        return int((self._rank[:num_positions] >= 0).sum())

    @cached_property
    def visual_cache_index(self) -> torch.Tensor:
        """[V] int64 each visual token's cache index (-1: dead here)."""
        return self.cache_index(self.visual_positions)

    @cached_property
    def copy_rows(self) -> torch.Tensor:
        """[c] int32: each cache index's row in a key copy of the alive visual tokens (-1: none);
        one object for every layer's copy, so the kernels' per-step key rows are computed once."""
        from vllm_tokenzoom.ops import rows_of

        index = self.visual_cache_index
        return rows_of(index[index >= 0])

    def alive_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual indices alive here [A], their cache indices [A]) on ``device``, computed once
        on the host: what the session scatters and gathers with, with no device-side search."""
        cached = self._on.get(device)
        if cached is None:
            rows = self.alive_visual.nonzero().flatten()
            cached = self._on[device] = (rows.to(device), self.visual_cache_index[rows].to(device))
        return cached

    @cached_property
    def _on(self) -> dict:
        return {}


@dataclass(frozen=True, eq=False)
class PackedSegments:
    """Every segment's prompt cache indices back to back (segment ``s`` at ``offsets[s]``), so a
    view's multiplicities over all of a request's segments are built, and their keys derived,
    in a handful of tensor ops instead of a handful per segment (the decode hot path when a
    decode policy re-selects at every step). Host-computed, on one device."""

    sizes: list[int]  # [S] each segment's alive prompt tokens
    offsets: torch.Tensor  # [S + 1] int64 cumulative sizes
    source: torch.Tensor  # [sum sizes] int64 the visual index at each packed index (V: a non-visual token)
    local: torch.Tensor  # [sum sizes] int64 each packed index's cache index in its segment
    copy_rows: torch.Tensor  # [sum sizes] int32 each packed index's row in its segment's key copy (-1: none)
    copy_ends: torch.Tensor  # [S] int64 offset + len(segment.copy_rows): the copied range of each

    def spread(self, visual: torch.Tensor) -> torch.Tensor:
        """visual: [V] multiplicities by visual index -> [sum sizes] by packed index (non-visual
        tokens read 1)."""
        return torch.cat((visual, visual.new_ones(1))).index_select(0, self.source)


def pack_segments(segments: list[Segment], device) -> PackedSegments:
    sizes = [seg.alive_prompt_tokens for seg in segments]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    source, local, copy_rows = [], [], []
    for seg, size in zip(segments, sizes):
        alive = seg.alive_visual.nonzero().flatten()
        into = torch.full((size,), seg.alive_visual.numel(), dtype=torch.int64)
        into[seg.visual_cache_index[alive]] = alive
        source.append(into)
        local.append(torch.arange(size))
        table = torch.full((size,), -1, dtype=torch.int32)
        table[: seg.copy_rows.numel()] = seg.copy_rows
        copy_rows.append(table)
    ends = offsets[:-1] + torch.tensor([seg.copy_rows.numel() for seg in segments], dtype=torch.int64)
    return PackedSegments(sizes, offsets.to(device), torch.cat(source).to(device), torch.cat(local).to(device),
                          torch.cat(copy_rows).to(device), ends.to(device))


class CacheLayout:
    """The segments of one request, from its death layers (``TokenView.death``)."""

    def __init__(self, token_map: TokenMap, death: torch.Tensor, num_layers: int):
        starts = sorted({0} | {int(d) + 1 for d in death.unique().tolist() if d < num_layers - 1})
        self.segments = [Segment(s, token_map.num_prompt_tokens, death >= s, token_map.positions) for s in starts]
        self._starts = starts

    def segment(self, layer: int) -> Segment:
        i = 0
        while i + 1 < len(self._starts) and self._starts[i + 1] <= layer:
            i += 1
        return self.segments[i]

    def packed_on(self, device) -> PackedSegments:
        """:class:`PackedSegments` of this layout's segments on ``device`` (computed once per device)."""
        cached = self._packed.get(device)
        if cached is None:
            cached = self._packed[device] = pack_segments(self.segments, device)
        return cached

    @cached_property
    def _packed(self) -> dict:
        return {}

    @property
    def boundaries(self) -> list[int]:
        """First layers of the segments after the first."""
        return self._starts[1:]

    def blocks_in_use(self, dead: torch.Tensor, num_positions: int, block_size: int) -> set[int]:
        """Logical blocks holding a token some layer may still read: every alive, not
        dead-everywhere token of ``0..num_positions - 1``, at its cache index, in every segment."""
        used: set[int] = set()
        every = torch.arange(num_positions)
        for seg in self.segments:
            keep = torch.ones(num_positions, dtype=torch.bool)
            visual = seg.visual_positions[seg.visual_positions < num_positions]
            gone = (~seg.alive_visual | dead)[: visual.numel()]
            keep[visual[gone]] = False
            index = seg.cache_index(every[keep])
            used.update((index[index >= 0] // block_size).unique().tolist())
        return used
