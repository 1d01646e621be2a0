"""ZoomVLM's Video Overview Augmenter (VOA): ZoomVLM §4.2 (Eqs. 6-9), App. D, App. E Alg. 1;
resolved in research/methods-spec.md §2.1, §2.4.1-7, §2.5.

Around the request, in two passes of the LLM (``v1/engine/voa.py`` runs them as two engine
requests behind one user request):
1. *Overview*: of N input frames, frames ``floor(i * frame_ratio)`` for ``i < ceil(N /
   frame_ratio)``, each frame's 14 x 14 projected tokens bilinearly pooled to ``grid x grid``.
   The LLM generates ``probe_tokens`` (s) tokens; in the forward that samples token #s, the
   query's attention, averaged over the layer set (OneVision: 0-based 10-25, clipped to the
   model) and heads, is averaged over each overview frame's tokens (Eq. 7); the ``keyframes``
   (k) frames with the most, ties to the earlier frame, are chosen (Eq. 8).
2. *Augmented*: the overview, then the chosen frames at full resolution, then the s tokens
   as prompt (their KV recomputed, Alg. 1), and generation goes on (Eq. 9).

The second pass is this policy with ``chosen`` set. Index space of the cells: a frame's
``grid * grid`` overview cells come first, then its full-resolution cells, so a VOA video's
``KeptTokens.cells`` is ``grid**2 + N_frame``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.ata import DEFAULT_LAYERS, score_layer_range
from vllm_tokenzoom.methods.base import (
    IN_LLM,
    DecodePolicy,
    KeptTokens,
    PreLLMPolicy,
    Queries,
    Requirements,
    ScoreRequest,
    Stage,
)

@dataclass(frozen=True)
class VOA(PreLLMPolicy):
    """Settings of ZoomVLM's video overview augmenter.

    Parameters
    ----------
    frame_ratio : float
        r_t: the overview keeps ``ceil(N / r_t)`` of N frames (ZoomVLM: 1.5, 32 -> 22).
    grid : int
        g: each overview frame pooled to g x g tokens (10: 100 of OneVision's 196).
    keyframes : int
        k: frames added at full resolution (ZoomVLM: 10).
    probe_tokens : int
        s: tokens generated from the overview before the keyframes are chosen (ZoomVLM: 20).
    first_score_layer, last_score_layer : int
        The layer set of Eq. 7 (0-based, inclusive); ``last_score_layer`` unset: 25 or the
        model's last layer, whichever is lower.
    chosen : list of int
        The keyframes (input frame indices, ascending): the second pass. Set by the engine
        between the passes; a request that sets it skips the first pass.
    """

    frame_ratio: float = 1.5
    grid: int = 10
    keyframes: int = 10
    probe_tokens: int = 20
    first_score_layer: int = DEFAULT_LAYERS[0]
    last_score_layer: int | None = None
    chosen: tuple[int, ...] | None = None

    stage = Stage.REQUEST
    # the probe decides from the forward that samples token #s, on the host when the step ends;
    # the second pass is built from the first's processed video (the processor cache would send
    # it to the engine only once)
    requirements = IN_LLM | Requirements(sync_scheduling=True, no_mm_processor_cache=True)

    def __post_init__(self):
        if not self.frame_ratio >= 1.0:
            raise TokenZoomConfigError(f"frame_ratio = {self.frame_ratio!r} is out of range; allowed: frame_ratio >= 1.0")
        for name in ("grid", "keyframes", "probe_tokens"):
            if getattr(self, name) < 1:
                raise TokenZoomConfigError(f"{name} = {getattr(self, name)!r} is out of range; allowed: {name} >= 1")
        if self.first_score_layer < 0:
            raise TokenZoomConfigError(f"first_score_layer = {self.first_score_layer} is out of range; allowed: >= 0")
        if self.last_score_layer is not None and self.last_score_layer < self.first_score_layer:
            raise TokenZoomConfigError(f"last_score_layer = {self.last_score_layer} is out of range; allowed: "
                                       f"last_score_layer >= first_score_layer ({self.first_score_layer})")
        if self.chosen is not None and (list(self.chosen) != sorted(set(self.chosen)) or min(self.chosen, default=0) < 0):
            raise TokenZoomConfigError(f"chosen = {list(self.chosen)!r} is not allowed; allowed: distinct frame "
                                       "indices >= 0 in ascending order")

    def check_model(self, num_layers: int) -> None:
        score_layer_range(self.first_score_layer, self.last_score_layer, num_layers)

    def for_model(self, num_layers: int, tokenizer=None) -> "VOA":
        _, last = score_layer_range(self.first_score_layer, self.last_score_layer, num_layers)
        return dataclasses.replace(self, last_score_layer=last)

    # -- the pre-LLM part: the overview, and the keyframes once chosen -------------------------
    def overview_frames(self, num_frames: int) -> list[int]:
        """Frame ids of the overview: ``floor(i * r_t)`` for ``i < ceil(N / r_t)`` (methods-spec §2.4.1)."""
        count = math.ceil(num_frames / self.frame_ratio - 1e-9)
        return [math.floor(i * self.frame_ratio + 1e-9) for i in range(count)]

    def check_frames(self, num_frames: int) -> None:
        if self.chosen and self.chosen[-1] >= num_frames:
            raise ValueError(f"voa.chosen = {list(self.chosen)} names a frame the video does not have; allowed: "
                             f"frame indices < {num_frames} (its number of frames)")

    def frames_used(self, num_frames: int) -> list[int]:
        """The overview's frames and the keyframes (the vision tower runs on these only)."""
        return sorted(set(self.overview_frames(num_frames)) | set(self.chosen or ()))

    def tower_reuse(self) -> str:
        """The second pass's frames are the first's (the keyframes are overview frames, §4.2)."""
        return "keep" if self.chosen is None else "take"

    def num_kept_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        self.check_frames(num_frames)
        return len(self.overview_frames(num_frames)) * self.grid ** 2 + len(self.chosen or ()) * tokens_per_frame

    def apply(self, frames: torch.Tensor) -> tuple[torch.Tensor, KeptTokens]:
        """frames: [T, N, D] -> (the overview's pooled tokens [F * g * g, D], then the chosen
        frames' [k * N, D]; each token's frame and cell in the space ``g * g + N``)."""
        num_frames, n, dim = frames.shape
        self.check_frames(num_frames)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"voa needs a square grid of tokens per frame, got {n}")
        overview = torch.tensor(self.overview_frames(num_frames), device=frames.device)  # [F]
        grid = frames[overview].transpose(1, 2).reshape(len(overview), dim, side, side)  # [F, D, s, s]
        pooled = torch.nn.functional.interpolate(grid, size=(self.grid, self.grid), mode="bilinear",
                                                 align_corners=False)  # [F, D, g, g]
        g2 = self.grid ** 2
        chosen = torch.tensor(self.chosen or (), dtype=torch.int64, device=frames.device)  # [k]
        tokens = torch.cat((pooled.flatten(2).transpose(1, 2).flatten(0, 1), frames[chosen].flatten(0, 1)))
        frame = torch.cat((overview.repeat_interleave(g2), chosen.repeat_interleave(n)))
        cell = torch.cat((torch.arange(g2, device=frames.device).repeat(len(overview)),
                          g2 + torch.arange(n, device=frames.device).repeat(len(chosen))))
        return tokens, KeptTokens(frame, cell, g2 + n, pooled=g2)

    # -- the first pass's decode-stage part ------------------------------------------------------
    def probe(self) -> "KeyframeProbe | None":
        """The first pass's probe (None in the second pass)."""
        if self.chosen is not None:
            return None
        if self.last_score_layer is None:
            raise ValueError("VOA.probe needs last_score_layer: resolve the policy with for_model(num_layers)")
        return KeyframeProbe(self.probe_tokens, self.keyframes, self.grid, self.first_score_layer, self.last_score_layer)


@dataclass(frozen=True)
class ProbeState:
    frame: torch.Tensor  # [V] int64, each visual token's frame
    frame_tokens: int  # tokens of a frame at full resolution (196 on LLaVA-OneVision)
    sampled: int = 0  # tokens sampled so far
    chosen: tuple[int, ...] | None = None


@dataclass(frozen=True)
class KeyframeProbe(DecodePolicy):
    """VOA's first pass between decode steps (Eqs. 7-8): reads every token, chooses the
    keyframes from the forward that samples token #``probe_tokens``."""

    probe_tokens: int
    keyframes: int
    grid: int
    first_score_layer: int
    last_score_layer: int

    after_sampling = True
    reports = True

    @property
    def first_layer(self) -> int:
        return 0

    def score_requests(self) -> tuple[ScoreRequest, ...]:
        layers = range(self.first_score_layer, self.last_score_layer + 1)
        return tuple(ScoreRequest(layer, Queries.NEXT_TOKEN) for layer in layers)

    def start(self, token_map) -> ProbeState:
        return ProbeState(token_map.frame, token_map.cells[0] - self.grid ** 2)

    def wants_scores(self, state: ProbeState, token: int) -> bool:
        return state.sampled + 1 == self.probe_tokens

    def step(self, scores: torch.Tensor | None, state: ProbeState, token: int) -> tuple[None, ProbeState]:
        """scores: [V] fp32 summed over the score layers (None but at token #``probe_tokens``).
        -> (None: every token read, the next state)."""
        sampled = state.sampled + 1
        chosen = state.chosen
        if sampled == self.probe_tokens:
            layers = self.last_score_layer - self.first_score_layer + 1
            chosen = choose_keyframes(scores.float() / layers, state.frame, self.keyframes)
        return None, ProbeState(state.frame, state.frame_tokens, sampled, chosen)

    def result(self, state: ProbeState | None):
        """The keyframes, and the tokens each adds to the second pass's prompt."""
        if state is None or state.chosen is None:
            return None
        return {"keyframes": list(state.chosen), "frame_tokens": state.frame_tokens}

    def describe(self, position: int, value, state: ProbeState):
        """The keyframes, once chosen: (position of the query after token #s, chosen frames)."""
        return None if state.chosen is None or state.sampled != self.probe_tokens else (position, list(state.chosen))


def choose_keyframes(mean: torch.Tensor, frame: torch.Tensor, k: int) -> tuple[int, ...]:
    """Eqs. 7-8. mean: [V] layer- and head-mean attention; frame: [V] each token's frame.
    -> the k frames whose tokens got the most on average, ties to the earlier frame, ascending."""
    frames, inverse = torch.unique(frame.to(mean.device), return_inverse=True)  # [F] ascending
    total = torch.zeros(len(frames), dtype=torch.float32, device=mean.device).index_add_(0, inverse, mean.float())
    count = torch.bincount(inverse, minlength=len(frames)).float()
    order = torch.argsort(-(total / count), stable=True)  # (A desc, frame asc)
    return tuple(sorted(frames[order[:k]].tolist()))
