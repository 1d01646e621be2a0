"""The in-LLM prefill hook: a decoder loop whose batch loses rows at layer boundaries.

vLLM's decoder models run ``for layer in layers: hidden, residual = layer(positions,
hidden, residual)``. Here, after each layer, the step settles the policies' decisions;
when tokens died at that layer (their death layer), their rows leave ``hidden``,
``residual`` and ``positions``, and the later layers run on the rows that remain, with
attention metadata rebuilt for them (``Step.after_layer``: query starts, sequence
lengths and slot mappings over the compacted cache indices of ``kv/layout.py``). So the
later layers really compute fewer rows: projections, attention and MLP. At the end the
rows are scattered back to the batch's size (dropped rows are never sampled: the last
prompt token and generated tokens never die), so vLLM's logits indices stay valid.

It runs eagerly (a compiled graph cannot change row counts mid-forward), only in steps
in which rows may die; other steps run the stock, possibly compiled, model. Works for the
Llama-style decoders vLLM builds (``embed_input_ids``, ``layers``, ``norm``), first and
last pipeline rank only (tokenzoom refuses pipeline parallelism for in-LLM methods).
"""
from __future__ import annotations

import torch


def forward_dropping_rows(model, step, ctx, input_ids, positions, inputs_embeds) -> torch.Tensor:
    """``model``: vLLM's ``Qwen2Model`` (or alike). -> hidden states [num_tokens, D] after the final norm."""
    hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
    num_tokens = hidden.shape[0]
    residual, rows = None, None  # rows: the batch tokens still in the batch (None: all)
    for index in range(model.start_layer, model.end_layer):
        hidden, residual = model.layers[index](positions, hidden, residual)
        keep = step.after_layer(index, ctx, hidden.shape[0])
        if keep is not None:
            keep = keep.to(hidden.device)
            hidden, residual, positions = hidden[keep], residual[keep], positions[keep]
            rows = keep if rows is None else rows[keep]
    hidden, _ = model.norm(hidden, residual)
    if rows is None:
        return hidden
    full = hidden.new_zeros(num_tokens, hidden.shape[1])
    full[rows] = hidden
    return full
