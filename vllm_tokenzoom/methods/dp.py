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

Index space: ``scores`` and the multiplicity are over *visual indices* (the request's
v-th visual token); mapping them to token positions is the token map's job.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.base import DecodePolicy, Queries, ScoreRequest, check_choice, check_ratio, top_k_mask

VARIANTS = ("paper", "official")


@dataclass(frozen=True)
class DPState:
    """What a request carries from one decode step to the next (all on the scores' device)."""

    last_scores: torch.Tensor  # [V] the previous step's visual-attention vector
    selection: torch.Tensor  # [V] bool, the selection in force (the last one chosen)


@dataclass(frozen=True)
class DP(DecodePolicy):
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
        An execution setting, not a semantic one (no effect on output, nor on CUDA): on CPU,
        keep per request a token-major copy of the visual tokens' K for layers ``>= L``
        (vLLM's CPU K layout makes a scattered keep set as slow to read as all of it).
        Memory outside vLLM's KV pool, about 40% of the request's KV with the preset.
    """

    layer: int = 3
    prune_ratio: float = 0.7
    threshold: float = 0.9
    variant: str = "paper"
    key_copy: bool = True

    def __post_init__(self):
        if self.layer < 1:
            raise TokenZoomConfigError(f"layer = {self.layer!r} is out of range; allowed: layer >= 1")
        check_ratio("prune_ratio", self.prune_ratio)
        check_ratio("threshold", self.threshold, -1.0, 1.0, high_open=False)
        check_choice("variant", self.variant, VARIANTS)

    def check_model(self, num_layers: int) -> None:
        if self.layer >= num_layers:
            raise TokenZoomConfigError(f"layer = {self.layer} is out of range for this model; "
                                       f"allowed: 1 <= layer < {num_layers} (its number of decoder layers)")

    @property
    def score_layer(self) -> int:
        """Index of the layer whose attention decides."""
        return self.layer - 1

    @property
    def first_layer(self) -> int:
        return self.layer

    def score_requests(self) -> tuple[ScoreRequest, ...]:
        return (ScoreRequest(self.score_layer, Queries.DECODE),)

    def num_kept(self, num_visual: int) -> int:
        return int(num_visual * (1.0 - self.prune_ratio))

    def mean_attended(self, num_visual: int, num_layers: int) -> float:
        """Visual tokens a decode step reads per layer, averaged over the model's layers:
        all of them in layers < L, ``num_kept`` in the others."""
        return (self.layer * num_visual + (num_layers - self.layer) * self.num_kept(num_visual)) / num_layers

    def step(self, scores: torch.Tensor, state: DPState | None) -> tuple[torch.Tensor, DPState]:
        """scores: [V] attention mass of the current query on each visual token (head mean,
        at the score layer). -> (multiplicity [V] uint8 for layers >= L: 1 read, 0 skipped;
        the next state). Pure, and free of host synchronisation: the stable/unstable branch is
        a ``torch.where`` on the scores' device."""
        scores = scores.float()
        chosen = top_k_mask(scores, self.num_kept(scores.numel()))
        if state is None:
            return chosen.to(torch.uint8), DPState(scores, chosen)
        cosine = torch.nn.functional.cosine_similarity(scores, state.last_scores, dim=0)
        stable = cosine >= self.threshold  # 0-d bool
        selection = torch.where(stable, state.selection, chosen)
        if self.variant == "paper":
            return selection.to(torch.uint8), DPState(scores, selection)
        return torch.where(stable, torch.ones_like(chosen), chosen).to(torch.uint8), DPState(scores, selection)
