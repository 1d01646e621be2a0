"""DyCoke dynamic KV pruning ("DP cache"): DyCoke §3.2(2), arXiv 2411.15024.

At each decode step the current query's attention over the visual tokens is read at
layer ``L`` (the L-th layer, index ``L - 1``, averaged over heads); layers with index
``>= L`` then attend only to the ``int(V * (1 - P))`` most attended visual tokens (and to
every non-visual token). The pruned tokens stay in the KV cache (the "DP cache") and
can be chosen again at a later step.

The selection is recomputed only when the attention pattern moved: when the cosine
similarity between this step's visual-attention vector and the previous step's falls
below ``threshold`` (and at the first decode step). Otherwise:
- ``variant="paper"`` (default): the previous selection is reused, the paper's intent;
- ``variant="official"``: layers ``>= L`` attend to *all* visual tokens at that step, as
  the official code does (KD-TAO/DyCoke ``modeling_qwen2.py``: ``kv_cache`` stays None).
The previous-step vector is updated at every step, in both variants.

Index space: ``scores`` and selections are *visual indices* (the request's i-th visual
token); mapping them to token positions is the KV view's job.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError

VARIANTS = ("paper", "official")


@dataclass(frozen=True)
class DPState:
    """What a request carries from one decode step to the next."""

    last_scores: torch.Tensor | None = None  # [V] the previous step's visual-attention vector
    selection: torch.Tensor | None = None  # [k] sorted visual indices in force (None: all)


@dataclass(frozen=True)
class DPDecision:
    selection: torch.Tensor | None  # [k] visual indices layers >= L attend to this step; None: all
    reselected: bool  # True when this step chose a new selection
    state: DPState  # carry to the next step


@dataclass(frozen=True)
class DP:
    """Settings of DyCoke's dynamic pruning.

    Parameters
    ----------
    layer : int
        ``L``: scores come from the L-th layer (index ``L - 1``); layers with index
        ``>= L`` are pruned. ``L >= 1``; it must be below the model's layer count.
    prune_ratio : float
        ``P``: fraction of visual tokens the pruned layers skip, ``0 <= P < 1``.
    threshold : float
        re-select when cosine(this step's scores, previous step's) < threshold, in [-1, 1].
    variant : str
        ``"paper"`` (reuse the selection on stable steps) or ``"official"`` (full attention).
    key_copy : bool
        How the pruned layers are computed, not what they compute. On CPU, keep per
        request a token-major copy of the visual tokens' K for layers ``>= L`` (vLLM's CPU
        K layout is transposed, so reading a scattered 30% of it costs about as much as
        reading all of it). Memory outside vLLM's KV pool: visual tokens x (layers - L) x
        KV heads x head size x dtype bytes per request, about 40% of the request's KV with
        the preset on Qwen2 models. No effect on output, nor on CUDA (token-major K).
    """

    layer: int = 3
    prune_ratio: float = 0.7
    threshold: float = 0.9
    variant: str = "paper"
    key_copy: bool = True

    def __post_init__(self):
        if self.layer < 1:
            raise TokenZoomConfigError(f"layer = {self.layer!r} is out of range; allowed: layer >= 1")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise TokenZoomConfigError(
                f"prune_ratio = {self.prune_ratio!r} is out of range; allowed: 0.0 <= prune_ratio < 1.0"
            )
        if not -1.0 <= self.threshold <= 1.0:
            raise TokenZoomConfigError(f"threshold = {self.threshold!r} is out of range; allowed: -1.0 <= threshold <= 1.0")
        if self.variant not in VARIANTS:
            raise TokenZoomConfigError(
                f"variant = {self.variant!r} is not known; allowed: {', '.join(map(repr, VARIANTS))}"
            )

    @property
    def score_layer(self) -> int:
        """Index of the layer whose attention decides."""
        return self.layer - 1

    def num_kept(self, num_visual: int) -> int:
        return int(num_visual * (1.0 - self.prune_ratio))

    def mean_attended(self, num_visual: int, num_layers: int) -> float:
        """Visual tokens a decode step reads per layer, averaged over the model's layers:
        all of them in layers < L, ``num_kept`` in the others."""
        return (self.layer * num_visual + (num_layers - self.layer) * self.num_kept(num_visual)) / num_layers

    def decide(self, scores: torch.Tensor, state: DPState) -> DPDecision:
        """scores: [V] float attention mass of the current query on each visual token
        (head-averaged, at the score layer). Pure: returns the decision and the next state."""
        scores = scores.float()
        stable = state.last_scores is not None and float(
            torch.nn.functional.cosine_similarity(scores, state.last_scores.float(), dim=0)
        ) >= self.threshold
        if stable:
            selection = state.selection if self.variant == "paper" else None
            return DPDecision(selection, False, DPState(scores, state.selection))
        selection = top_k_visual(scores, self.num_kept(scores.numel()))
        return DPDecision(selection, True, DPState(scores, selection))


def top_k_visual(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[V] scores -> [k] sorted visual indices of the k largest (ties: the earlier index)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values
