"""Prefill-stage methods (FastV, VAS) as a dense reference hook (``reference/attention.py``),
methods-spec §0 "Dense reference", §1.5 and §3.5:

1. the whole prompt runs through every layer (HF keeps full-length tensors);
2. at each layer the policy scores at, the fp32 probabilities of the queries it asks for
   (the last prompt token, or every prompt token after the video), averaged over the query
   heads and summed over those queries, score the visual tokens (softmax over every key
   visible at that layer); the same policy object as vLLM's decides;
3. a token dropped after layer ``k`` is hidden from every query, prompt and decode alike,
   in layers ``> k`` (what dropping its row gives the rows that remain); positions are
   unchanged, and its own row's outputs are ignored (it is never sampled).
"""
from __future__ import annotations

import torch

from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.methods.base import PrefillPolicy, Queries


class PrefillReference:
    """``trace``: the policy's entry (``PrefillPolicy.describe``) for each drop; ``death``: [V]
    each visual token's death layer (the last layer that holds its KV)."""

    def __init__(self, name: str, policy: PrefillPolicy, token_map: TokenMap, num_layers: int):
        self.name, self.policy, self.token_map = name, policy, token_map
        self.state = policy.start(token_map)
        self.asks = {a.layer: a.queries for a in policy.score_requests()}
        self.death = torch.full((token_map.num_visual,), num_layers - 1, dtype=torch.int64)
        self.trace: list = []

    def hidden(self, layer, query_positions, kv_len):
        dead = self.death < layer
        if not bool(dead.any()):
            return None
        hidden = torch.zeros(kv_len, dtype=torch.bool)
        hidden[self.token_map.positions[dead]] = True
        return hidden

    def observe(self, layer, probs, query_positions):
        n = self.token_map.num_prompt_tokens
        queries = self.asks.get(layer)
        if queries is None or int(query_positions[-1]) != n - 1 or int(query_positions[0]) != 0:
            return  # not a layer it scores at, or not the prefill forward
        first = n - 1 if queries is Queries.LAST_PROMPT else self.token_map.first_text_position
        row = probs[:, first:n, :].mean(0).sum(0)  # [kv]: head mean, summed over the queries
        dropped, self.state = self.policy.decide(layer, row[self.token_map.positions], self.state)
        if dropped is not None:
            dropped = dropped & (self.death > layer)
            self.death[dropped] = layer
            self.trace.append(self.policy.describe(layer, dropped, self.state))
