"""FastV, "An Image is Worth 1/2 Tokens After Layer 2" (arXiv 2403.06764), the baseline of
VAS and DyCoke, with its official code's semantics (pkunlp-icler/FastV, the KV-cache path of
``fastv_forward``; research/methods-spec.md §3.3):

- the score of a visual token is the attention the *last prompt token* gives it at layer
  index ``K - 1``, mean over query heads, softmax over every prompt key (fp32);
- ``round(V * (1 - R))`` visual tokens are kept (Python's round, half to even), the most
  attended first, ties to the earlier position; the video's newline is always kept;
- the others leave the batch after layer ``K - 1``: layers ``K..`` compute fewer rows and
  never write or read their KV; kept tokens keep their original positions;
- the kept set is fixed for decode (the paper's no-cache per-step re-selection has no
  KV-cache equivalent).

Layer-averaged visual KV share: ``(K + (L - K) * (1 - R)) / L`` (53.6% for K=2, R=0.5, L=28).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods.base import PrefillPolicy, Queries, ScoreRequest, check_ratio, top_k_mask


@dataclass(frozen=True)
class FastV(PrefillPolicy):
    """Settings of FastV.

    Parameters
    ----------
    layer : int
        ``K``: scores come from layer index ``K - 1``; layers ``>= K`` compute the kept
        visual tokens only. ``1 <= K < `` the model's number of layers.
    prune_ratio : float
        ``R``: the fraction of visual tokens dropped, ``0 <= R < 1``.
    """

    layer: int = 2
    prune_ratio: float = 0.5

    def __post_init__(self):
        if self.layer < 1:
            raise TokenZoomConfigError(f"layer = {self.layer!r} is out of range; allowed: layer >= 1")
        check_ratio("prune_ratio", self.prune_ratio)

    def check_model(self, num_layers: int) -> None:
        if self.layer >= num_layers:
            raise TokenZoomConfigError(f"layer = {self.layer} is out of range for this model; "
                                       f"allowed: 1 <= layer < {num_layers} (its number of decoder layers)")

    def score_requests(self) -> tuple[ScoreRequest, ...]:
        return (ScoreRequest(self.layer - 1, Queries.LAST_PROMPT),)

    def num_kept(self, num_visual: int) -> int:
        return round(num_visual * (1.0 - self.prune_ratio))

    def visual_kv_share(self, num_layers: int) -> float:
        """Layer-averaged share of the visual tokens whose KV a layer holds (methods-spec §0)."""
        return (self.layer + (num_layers - self.layer) * (1.0 - self.prune_ratio)) / num_layers

    def decide(self, layer: int, scores: torch.Tensor, state=None) -> tuple[torch.Tensor | None, None]:
        """scores: [V] at layer ``K - 1`` -> ([V] bool, True for the tokens that leave after it)."""
        if layer != self.layer - 1:
            return None, state
        return ~top_k_mask(scores.float(), self.num_kept(scores.numel())), None
