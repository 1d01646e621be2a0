"""DyCoke's dynamic pruning (DyCoke §3.2(2)) as a dense reference hook (``reference/attention.py``).

HF keeps the full KV cache (as DyCoke's ``PrunableDynamicCache`` does); at each decode
step the L-th layer's attention (index ``L - 1``, the current query, averaged over heads)
decides, through the same :class:`~vllm_tokenzoom.methods.dp.DP` policy, which visual
keys the layers ``>= L`` may attend to, and those layers mask the others out. Masking a
key is exactly DyCoke's gather of the kept keys.
"""
from __future__ import annotations

import torch

from vllm_tokenzoom.methods.dp import DP


class DPReference:
    """``trace``: per decode step, (query position, visual indices read by layers >= L, or None: all)."""

    name = "dp"

    def __init__(self, dp: DP, visual_positions: torch.Tensor, num_prompt_tokens: int):
        self.dp, self.visual, self.num_prompt_tokens = dp, visual_positions, num_prompt_tokens
        self.state, self.value = None, None
        self.trace: list[tuple[int, list[int] | None]] = []

    def _decode(self, query_positions, kv_len) -> bool:
        return query_positions.numel() == 1 and kv_len > self.num_prompt_tokens

    def hidden(self, layer, query_positions, kv_len):
        if not self._decode(query_positions, kv_len) or layer < self.dp.layer or self.value is None:
            return None
        hidden = torch.zeros(kv_len, dtype=torch.bool)
        hidden[self.visual[self.value == 0]] = True
        return hidden

    def observe(self, layer, probs, query_positions):
        kv_len = probs.shape[-1]
        if not self._decode(query_positions, kv_len) or layer != self.dp.score_layer:
            return
        self.value, self.state = self.dp.step(probs[:, -1, :].mean(0)[self.visual], self.state)
        selection = None if bool((self.value == 1).all()) else self.value.nonzero().flatten().tolist()
        self.trace.append((kv_len - 1, selection))
