"""VAS, Visual Attention Shrinking (ICLR 2025 submission, OpenReview oS79Tw3G0c; no public
code), resolved for vLLM in research/methods-spec.md §1.2-1.3:

- at each layer ``k`` in ``[start_layer, end_layer]`` every visual token is scored by the
  attention the text after the video gives it (§3.2 Eq. 5: summed over those queries, mean
  over query heads, fp32, softmax over the keys alive at ``k``);
- the scores are aggregated per frame (``T_k``) and per spatial cell (``S_k``), always over
  the tokens alive now, for the last three layers (§1.2.6);
- from ``k = start_layer + 2`` on, a drop happens when more than ``ratio`` of the frames (or
  cells) shrank strictly over those three layers, or when ``interval`` layers passed
  without one (§1.2.2); it removes ``clamp(floor(ratio * count + 0.5), 1, count - 1)``
  whole frames or cells (§1.2.5), the last of the order (``D`` desc, index asc) with
  ``D = c0 X_k + c1 X_{k-1} + c2 X_{k-2}`` (§1.2.3), on the axis of §1.2.4;
- their rows leave the batch after layer ``k`` (their death layer); the rest is as FastV's.

Groups are per video: a frame is (video, frame), a cell (video, cell); with one video
(the paper's case) these are its frames and its 14 x 14 cells. After TTM a frame holds
fewer than 196 tokens; a group is alive while it holds an alive token.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.base import PrefillPolicy, Queries, ScoreRequest, check_choice, check_ratio

AXES = ("auto", "frames", "cells")
_NAMES = {0: "frames", 1: "cells"}


@dataclass(frozen=True)
class VASState:
    """One request's VAS state during its prefill (host tensors: groups are few)."""

    groups: tuple[torch.Tensor, torch.Tensor]  # [V] int64 frame group, cell group of each visual token
    alive: torch.Tensor  # [V] bool
    history: tuple[torch.Tensor, ...] = ()  # scores [V] of the last (up to) three layers, oldest first
    last_drop: int = -1
    last_axis: str = ""  # of the last drop: "frames", "cells" or "all" (drop_all_at_end)


@dataclass(frozen=True)
class VAS(PrefillPolicy):
    """Settings of VAS (methods-spec §1.2; each default is the spec's resolution).

    Parameters
    ----------
    ratio : float
        ``r``: the share of the current frames (or cells) removed per drop, and the shrink
        fraction a drop needs (Alg. 1 line 10); ``0 < r < 1``.
    interval : int
        the most layers without a drop (Table 4's maximum dropping interval), ``>= 1``.
    start_layer : int
        the first layer that scores (0-based); the first decision is at ``start_layer + 2``.
    end_layer : int | None
        the last layer that scores and drops (inclusive); None: the model's last layer
        index - 4 (§3.3 "More Details"). ``start_layer + 2 <= end_layer <= L - 2``.
    coefficients : list[float]
        ``(c0, c1, c2)`` of the ranking ``D = c0 X_k + c1 X_{k-1} + c2 X_{k-2}`` (literal: 1, -1, 1).
    axis : str
        ``"auto"`` (§1.2.4: the axis whose condition fired; both or forced: the larger shrink
        fraction, ties to frames), ``"frames"`` or ``"cells"`` (that axis only).
    drop_all_at_end : bool
        every visual token still alive dies at ``end_layer`` (§1.2.10).
    """

    ratio: float = 0.3
    interval: int = 4
    start_layer: int = 2
    end_layer: int | None = None
    coefficients: tuple[float, ...] = (1.0, -1.0, 1.0)
    axis: str = "auto"
    drop_all_at_end: bool = False

    def __post_init__(self):
        check_ratio("ratio", self.ratio)
        if self.ratio == 0:
            raise TokenZoomConfigError("ratio = 0 is out of range; allowed: 0 < ratio < 1")
        if self.interval < 1:
            raise TokenZoomConfigError(f"interval = {self.interval!r} is out of range; allowed: interval >= 1")
        if self.start_layer < 0:
            raise TokenZoomConfigError(f"start_layer = {self.start_layer!r} is out of range; allowed: start_layer >= 0")
        if self.end_layer is not None and self.end_layer < self.start_layer + 2:
            raise TokenZoomConfigError(f"end_layer = {self.end_layer!r} is out of range; allowed: end_layer >= "
                                       f"start_layer + 2 = {self.start_layer + 2} (the first decision needs three "
                                       "layers of scores)")
        if len(self.coefficients) != 3:
            raise TokenZoomConfigError(f"coefficients = {list(self.coefficients)!r} has the wrong length; "
                                       "allowed: three numbers (c0, c1, c2)")
        check_choice("axis", self.axis, AXES)

    def check_model(self, num_layers: int) -> None:
        end = self.last_layer(num_layers)
        what = "end_layer" if self.end_layer is not None else f"end_layer (unset: last layer index - 4 = {end})"
        if not self.start_layer + 2 <= end <= num_layers - 2:
            raise TokenZoomConfigError(
                f"{what} = {end} is out of range for this model; allowed: start_layer + 2 = {self.start_layer + 2} "
                f"<= end_layer <= {num_layers - 2} (the model has {num_layers} decoder layers; a drop after the "
                "last one saves nothing)")

    def last_layer(self, num_layers: int) -> int:
        return num_layers - 5 if self.end_layer is None else self.end_layer

    def for_model(self, num_layers: int, tokenizer=None) -> "VAS":
        self.check_model(num_layers)
        return dataclasses.replace(self, end_layer=self.last_layer(num_layers))

    def score_requests(self) -> tuple[ScoreRequest, ...]:
        if self.end_layer is None:
            raise ValueError("VAS.score_requests needs end_layer: resolve the policy with for_model(num_layers)")
        return tuple(ScoreRequest(k, Queries.TEXT_AFTER_VIDEO) for k in range(self.start_layer, self.end_layer + 1))

    # -- the decision (methods-spec §1.3) ---------------------------------------------------
    def start(self, token_map) -> VASState:
        """The groups of a request's visual tokens (``kv/token_map.TokenMap``)."""
        if token_map.num_visual and bool((token_map.frame < 0).any()):
            raise ValueError("VAS needs each visual token's frame and cell; the pre-LLM plan is missing")
        groups = tuple(torch.unique(token_map.video * (1 << 32) + x, return_inverse=True)[1]
                       for x in (token_map.frame, token_map.cell))
        return VASState(groups, torch.ones(token_map.num_visual, dtype=torch.bool), last_drop=self.start_layer - 1)

    def decide(self, layer: int, scores: torch.Tensor, state: VASState) -> tuple[torch.Tensor | None, VASState]:
        """scores: [V] at ``layer`` -> ([V] bool, True for the tokens whose rows leave after it; the next state)."""
        if not self.start_layer <= layer <= self.end_layer:
            return None, state
        state = dataclasses.replace(state, history=(*state.history, scores.detach().float().cpu())[-3:])
        dropped, axis = self._drop(layer, state) if layer >= self.start_layer + 2 else (None, "")
        if layer == self.end_layer and self.drop_all_at_end:
            dropped, axis = state.alive.clone(), "all"
        if dropped is None or not bool(dropped.any()):
            return None, state
        return dropped, dataclasses.replace(state, alive=state.alive & ~dropped, last_drop=layer, last_axis=axis)

    def _drop(self, layer: int, state: VASState) -> tuple[torch.Tensor | None, str]:
        """([V] bool of the tokens of the groups removed at ``layer``, or None: no drop; the axis)."""
        sums, alive_groups, shrink = [], [], []
        for group in state.groups:
            x = [_group_sums(h, group, state.alive) for h in state.history]  # X_{k-2}, X_{k-1}, X_k
            on = torch.zeros(x[0].numel(), dtype=torch.bool)
            on[group[state.alive]] = True
            sums.append(x)
            alive_groups.append(on.nonzero().flatten())
            shrinking = (x[0] > x[1]) & (x[1] > x[2])
            shrink.append(float(shrinking[on].float().mean()) if bool(on.any()) else 0.0)
        fired = [s > self.ratio for s in shrink]
        if self.axis != "auto":
            fired = [f and _NAMES[a] == self.axis for a, f in enumerate(fired)]
        forced = layer - state.last_drop >= self.interval
        if not (any(fired) or forced):
            return None, ""
        axis = self._axis(fired, shrink, [g.numel() for g in alive_groups])
        if axis is None:
            return None, ""
        x, groups = sums[axis], alive_groups[axis]
        c0, c1, c2 = self.coefficients
        d = (c0 * x[2] + c1 * x[1] + c2 * x[0])[groups].tolist()
        count = groups.numel()
        n_rm = min(max(int(self.ratio * count + 0.5), 1), count - 1)
        order = sorted(range(count), key=lambda i: (-d[i], i))  # groups are in index order
        removed = groups[torch.tensor(order[count - n_rm:])]
        return state.alive & torch.isin(state.groups[axis], removed), _NAMES[axis]

    def _axis(self, fired: list[bool], shrink: list[float], counts: list[int]) -> int | None:
        """§1.2.4: 0 (frames) or 1 (cells), or None when no axis has two groups left."""
        if self.axis != "auto":
            axis = AXES.index(self.axis) - 1
            return axis if counts[axis] >= 2 else None
        if fired[0] != fired[1]:
            axis = 0 if fired[0] else 1
        else:  # both fired, or a forced drop
            axis = 0 if shrink[0] >= shrink[1] else 1
        if counts[axis] < 2:
            axis = 1 - axis
        return axis if counts[axis] >= 2 else None

    def describe(self, layer: int, dropped: torch.Tensor, state: VASState) -> dict:
        """The trace entry of the drop at ``layer`` (``state``: after it): its axis, the frame
        and cell groups and the visual indices left."""
        return dict(layer=layer, axis=state.last_axis, frames=state.groups[0][state.alive].unique().tolist(),
                    cells=state.groups[1][state.alive].unique().tolist(),
                    kept=state.alive.nonzero().flatten().tolist())


def _group_sums(scores: torch.Tensor, group: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """[G] the sum of each group's alive tokens' scores."""
    out = torch.zeros(int(group.max()) + 1 if group.numel() else 0)
    return out.index_add_(0, group[alive], scores[alive])

