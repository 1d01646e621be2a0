"""DyCoke's dynamic pruning (DyCoke §3.2(2)) as a dense HF-transformers attention function.

HF keeps the full KV cache (as DyCoke's ``PrunableDynamicCache`` does); at each decode
step the L-th layer's attention (index ``L - 1``, the current query, averaged over heads)
decides, through the same :class:`~vllm_tokenzoom.methods.dp.DP` policy, which visual
keys the layers ``>= L`` may attend to, and those layers mask the others out. Masking a
key is exactly DyCoke's gather of the kept keys.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from vllm_tokenzoom.methods.dp import DP, DPState

NAME = "tokenzoom_dp_reference"
_ACTIVE: list["DPAttention"] = []


class DPAttention:
    """Per-generation state; ``trace`` lists (query position, selection or None) per decode step."""

    def __init__(self, dp: DP, visual_positions: torch.Tensor, num_prompt_tokens: int):
        self.dp, self.visual, self.num_prompt_tokens = dp, visual_positions, num_prompt_tokens
        self.state, self.selection = DPState(), None
        self.trace: list[tuple[int, list[int] | None]] = []

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        # query: [1, Hq, q, hs]; key, value: [1, Hkv, kv, hs] (the whole cache)
        layer, (q_len, kv_len) = module.layer_idx, (query.shape[2], key.shape[2])
        group = query.shape[1] // key.shape[1]
        k = key.float().repeat_interleave(group, dim=1)
        v = value.float().repeat_interleave(group, dim=1)
        logits = torch.matmul(query.float(), k.transpose(2, 3)) * scaling  # [1, Hq, q, kv]
        query_pos = torch.arange(kv_len - q_len, kv_len)
        visible = torch.arange(kv_len)[None, :] <= query_pos[:, None]  # [q, kv]
        decode = q_len == 1 and kv_len > self.num_prompt_tokens
        if decode and layer >= self.dp.layer and self.selection is not None:
            dropped = torch.ones(self.visual.numel(), dtype=torch.bool)
            dropped[self.selection] = False
            visible[:, self.visual[dropped]] = False
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        if decode and layer == self.dp.score_layer:
            decision = self.dp.decide(probs[0, :, -1, :].mean(0)[self.visual], self.state)
            self.state, self.selection = decision.state, decision.selection
            self.trace.append((kv_len - 1, None if decision.selection is None else decision.selection.tolist()))
        out = torch.matmul(probs, v).transpose(1, 2).contiguous()  # [1, q, Hq, hs]
        return out.to(query.dtype), probs


def _dispatch(*args, **kwargs):
    return _ACTIVE[-1](*args, **kwargs)


@contextmanager
def dp_attention(model, dp: DP, visual_positions: torch.Tensor, num_prompt_tokens: int):
    """Run ``model`` (an HF LLaVA-OneVision) with DyCoke's dynamic pruning; yields the state."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _dispatch)
    text_config = model.config.text_config
    previous = text_config._attn_implementation
    attention = DPAttention(dp, visual_positions, num_prompt_tokens)
    _ACTIVE.append(attention)
    text_config._attn_implementation = NAME
    try:
        yield attention
    finally:
        text_config._attn_implementation = previous
        _ACTIVE.pop()
