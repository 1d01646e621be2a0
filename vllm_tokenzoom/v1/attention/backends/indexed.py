"""The part of tokenzoom's attention backends that is the same on every platform.

A backend impl mixes :class:`IndexedRowsMixin` in before the platform's impl and says
where a layer's K and V live (:meth:`kv_regions`); its metadata builder binds the step
(``v1/worker/step.py``) to the metadata with :func:`with_step`. Per layer call:
- fast path: no step, or nothing to do at this layer -> the platform's kernel, unchanged
  (it also serves rows whose earlier layers dropped tokens: their metadata is compacted);
- indexed path: the queries the step names (:meth:`Step.needs`) are computed over their
  token view (keys = cache indices with multiplicity > 0, logit bias ``log m``), and the
  head-mean attention of those whose scores a policy asked for goes back to the step. If
  other queries remain, the platform's kernel runs for the batch first and the indexed
  queries overwrite their rows. On CPU all of a layer's indexed queries go to the C++
  kernel in one call; elsewhere one call per query (Triton on CUDA).
- kept queries (:meth:`Step.later`): the query that samples a token, at the layers an
  after-sampling policy scores, is kept with what it read; its attention is computed after
  sampling, only if the token calls for it (ATA: every few sentence ends).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from vllm_tokenzoom.ops import decode_requests, indexed_paged_attention, layout_code, run_decode_requests, runs_cpp_kernel
from vllm_tokenzoom.v1.worker import step as steps


@dataclass(kw_only=True)
class StepMetadata:
    """The field a tokenzoom backend adds to its platform's attention metadata (a mixin:
    ``@dataclass class M(PlatformMetadata, StepMetadata)``)."""

    tz_step: object | None = None  # this step's Step (None: fast path)


def with_step(cls, builder, metadata, common_attn_metadata):
    """The platform's ``metadata`` as ``cls`` (its subclass with :class:`StepMetadata`), the step bound."""
    step = steps._CURRENT[0]
    if step is not None and not step.bind(builder, common_attn_metadata):
        step = None  # not this step's batch (a profiling or dummy run)
    return cls(**{f.name: getattr(metadata, f.name) for f in fields(metadata)}, tz_step=step)


class IndexedRowsMixin:
    def kv_regions(self, layer, kv_cache: torch.Tensor):
        """-> (k_region, v_region [nb, Hkv, B*hs] views, k_offsets, v_offsets [B, hs])."""
        raise NotImplementedError

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = getattr(attn_metadata, "tz_step", None)
        needs = ()
        if step is not None and self.attn_type == AttentionType.DECODER:
            layer_index = extract_layer_index(layer.layer_name)
            needs = step.needs(layer_index)
            later = step.later(layer_index)
            if later:
                self._keep_queries(layer_index, step, query, self.kv_regions(layer, kv_cache), later)
        if not needs:  # fast path: the platform's kernel, unchanged
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if len(needs) < step.layout(layer_index).num_tokens:  # other queries read the cache as usual
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        regions = self.kv_regions(layer, kv_cache)
        block_table = step.common.block_table_tensor
        if runs_cpp_kernel(query):
            self._cpp_queries(layer_index, step, query, regions, block_table, output, needs)
        else:
            for need in needs:
                self._one_query(layer_index, step, query, regions, block_table, output, need)
        return output

    def _cpp_queries(self, layer_index, step, query, regions, block_table, output, needs) -> None:
        """Every indexed query of the layer in one C++ kernel call (CPU). What the call reads
        but the layer's K and V (rows, key lists, biases, copy rows) is prepared once per step
        for the layers that share ``needs`` (one object per layout and views)."""
        k_region, v_region, k_offsets, v_offsets = regions
        prep = step.prepared.get(id(needs))
        if prep is None or prep[0] is not needs:
            copied = [_reads_key_copy(layer_index, n, k_offsets) for n in needs]
            requests = decode_requests([n.cache_len for n in needs], [n.multiplicity for n in needs],
                                       [n.segment.copy_rows if c else None for n, c in zip(needs, copied)],
                                       memo=step.row_memo)
            rows = block_table[torch.tensor([n.row for n in needs])]  # [R, max_blocks]
            prep = step.prepared[id(needs)] = (needs, torch.tensor([n.token for n in needs]), rows, requests, copied)
        _, tokens, rows, requests, copied = prep
        copies = [n.session.key_copy(layer_index, n.segment, k_region, k_offsets, rows[i]) if c else None
                  for i, (n, c) in enumerate(zip(needs, copied))]
        assert all(c is None or c.row_of is n.segment.copy_rows for c, n in zip(copies, needs)), \
            "a key copy made for another cache layout"
        want_mass = any(n.scores for n in needs)
        out, masses, keys = run_decode_requests(query.index_select(0, tokens), k_region, v_region, k_offsets, v_offsets, rows, requests,
                                                self.scale, want_mass=want_mass, key_copies=copies)
        output.index_copy_(0, tokens, out.view(len(needs), *output.shape[1:]).to(output.dtype))
        for need, mass, row_keys in zip(needs, masses or [None] * len(needs), keys):
            if need.scores:
                step.record(layer_index, need, _all_heads(mass[0], self.num_heads), row_keys)

    def _one_query(self, layer_index, step, query, regions, block_table, output, need) -> None:
        k_region, v_region, k_offsets, v_offsets = regions
        q = query[need.token:need.token + 1]
        out, mass, keys = indexed_paged_attention(q, k_region, v_region, k_offsets, v_offsets,
                                                  block_table[need.row], need.cache_len, need.multiplicity,
                                                  self.scale, want_mass=bool(need.scores))
        output[need.token:need.token + 1] = out.view(output[need.token:need.token + 1].shape).to(output.dtype)
        if need.scores:
            step.record(layer_index, need, _all_heads(mass[0], self.num_heads), keys)

    def _keep_queries(self, layer_index, step, query, regions, later) -> None:
        """Keep each of ``later``'s queries ([1, Hq, hs], a view of one copy of all of the layer's)
        with its block-table row and key copy, for :meth:`_later_scores` after sampling (the cache
        keeps what it read till then)."""
        block_table = step.common.block_table_tensor
        queries = query.index_select(0, torch.tensor([n.token for n in later], device=query.device))  # [R, Hq, hs]
        block_rows = block_table.index_select(0, torch.tensor([n.row for n in later], device=block_table.device))
        for i, need in enumerate(later):
            copy = (need.session.key_copy(layer_index, need.segment, regions[0], regions[2], block_rows[i])
                    if _reads_key_copy(layer_index, need, regions[2]) else None)
            step.keep(layer_index, need, functools.partial(self._later_scores, need, queries[i:i + 1], regions,
                                                           block_rows[i], copy))

    def _later_scores(self, need, q, regions, block_row, copy) -> torch.Tensor:
        """[V] scores of a kept query: its head-mean attention over what it read."""
        _, mass, keys = indexed_paged_attention(q, *regions, block_row, need.cache_len, need.multiplicity, self.scale,
                                                key_copy=copy)
        return need.session.visual_scores(need.segment, _all_heads(mass[0], self.num_heads), keys, need.cache_len)


def _reads_key_copy(layer_index: int, need, k_offsets) -> bool:
    """Whether a pruned decode query reads the session's key copy at this layer (over vLLM's
    transposed CPU K)."""
    return (need.multiplicity is not None and need.position >= need.session.num_prompt_tokens
            and need.session.wants_key_copy(layer_index) and layout_code(k_offsets, transposed_ok=True) == 2)


def _all_heads(mass: torch.Tensor, local_heads: int) -> torch.Tensor:
    """Head-averaged mass over *all* heads: with tensor parallelism each rank holds some of
    them, so the ranks' sums are all-reduced and every rank decides the same (same rows, same
    order on every rank). Not exercised here: no multi-rank test on this machine."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return mass
    return tensor_model_parallel_all_reduce(mass * local_heads) / (local_heads * world)
