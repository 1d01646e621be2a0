"""FastV (methods-spec.md §3.5) as a dense reference hook (``reference/attention.py``).

1. Layers ``0..K-1`` run on the full prompt.
2. At layer ``K - 1`` the last prompt row's probabilities (fp32, softmax over every prompt
   key), averaged over the query heads, score the visual tokens; the same
   :class:`~vllm_tokenzoom.methods.fastv.FastV` policy keeps ``round(V (1 - R))`` of them.
3. Layers ``>= K`` hide the dropped tokens' keys from every query, prompt and decode alike
   (what dropping their rows gives the rows that remain); positions are unchanged.
"""
from __future__ import annotations

import torch

from vllm_tokenzoom.methods.fastv import FastV


class FastVReference:
    """``trace``: [(layer K - 1, kept visual indices)] once the prompt was prefilled."""

    name = "fastv"

    def __init__(self, fastv: FastV, visual_positions: torch.Tensor, num_prompt_tokens: int):
        self.fastv, self.visual, self.num_prompt_tokens = fastv, visual_positions, num_prompt_tokens
        self.dropped: torch.Tensor | None = None  # [V] bool
        self.trace: list[tuple[int, list[int]]] = []

    def hidden(self, layer, query_positions, kv_len):
        if self.dropped is None or layer < self.fastv.layer:
            return None
        hidden = torch.zeros(kv_len, dtype=torch.bool)
        hidden[self.visual[self.dropped]] = True
        return hidden

    def observe(self, layer, probs, query_positions):
        last = self.num_prompt_tokens - 1
        if self.dropped is not None or layer != self.fastv.layer - 1 or int(query_positions[-1]) != last:
            return
        row = probs[:, query_positions.numel() - 1, :].mean(0)  # [kv]: the last prompt token, head mean
        self.dropped, _ = self.fastv.decide(layer, row[self.visual])
        self.trace.append((layer, (~self.dropped).nonzero().flatten().tolist()))
