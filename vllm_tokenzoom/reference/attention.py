"""A plain-torch attention function for HF transformers with per-method key masks: the
dense oracle every in-LLM method is checked against (research/methods-spec.md §0).

Each method contributes a *hook* (``reference/<method>.py``):
- ``hidden(layer, query_positions, kv_len)`` -> [kv_len] bool of keys the queries must not
  see at this layer (or None): a pruned or dropped token. Masking a key gives the other rows
  exactly what deleting its row gives (a row depends only on itself and the keys it sees),
  so the reference keeps full-length tensors and masks, while vLLM drops rows;
- ``observe(layer, probs, query_positions)``: the fp32 attention probabilities
  [Hq, q, kv] of this layer (softmax over every visible key), from which it decides;
- optionally ``bias(layer, query_positions, kv_len)`` -> [kv_len] fp32 added to every logit
  of a key (or None): ``log c`` for a key counted c times (exactly attending c copies of it).
Hooks compose: a key is hidden when any hook hides it, biases add. HF's KV cache keeps every key.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

NAME = "tokenzoom_reference"
_ACTIVE: list["ReferenceAttention"] = []


class ReferenceAttention:
    def __init__(self, hooks):
        self.hooks = list(hooks)

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        # query: [1, Hq, q, hs]; key, value: [1, Hkv, kv, hs] (the whole cache)
        layer, (q_len, kv_len) = module.layer_idx, (query.shape[2], key.shape[2])
        group = query.shape[1] // key.shape[1]
        k = key.float().repeat_interleave(group, dim=1)
        v = value.float().repeat_interleave(group, dim=1)
        logits = torch.matmul(query.float(), k.transpose(2, 3)) * scaling  # [1, Hq, q, kv]
        query_positions = torch.arange(kv_len - q_len, kv_len)
        visible = torch.arange(kv_len)[None, :] <= query_positions[:, None]  # [q, kv]
        for hook in self.hooks:
            hidden = hook.hidden(layer, query_positions, kv_len)
            if hidden is not None:
                visible = visible & ~hidden[None, :]
        for hook in self.hooks:
            bias = getattr(hook, "bias", None)
            bias = bias(layer, query_positions, kv_len) if bias is not None else None
            if bias is not None:
                logits = logits + bias
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        for hook in self.hooks:
            hook.observe(layer, probs[0], query_positions)
        out = torch.matmul(probs, v).transpose(1, 2).contiguous()  # [1, q, Hq, hs]
        return out.to(query.dtype), probs


def _dispatch(*args, **kwargs):
    return _ACTIVE[-1](*args, **kwargs)


@contextmanager
def reference_attention(model, hooks):
    """Run ``model`` (an HF LLaVA-OneVision) with the hooks' masks; yields the attention function."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _dispatch)
    text_config = model.config.text_config
    previous = text_config._attn_implementation
    attention = ReferenceAttention(hooks)
    _ACTIVE.append(attention)
    text_config._attn_implementation = NAME
    try:
        yield attention
    finally:
        text_config._attn_implementation = previous
        _ACTIVE.pop()
