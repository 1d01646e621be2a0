"""The part of tokenzoom's attention backends that is the same on every platform.

A backend impl mixes :class:`IndexedRowsMixin` in before the platform's impl and says
where a layer's K and V live (:meth:`kv_regions`); its metadata builder publishes the
batch rows' sessions with :func:`with_rows` (metadata class mixing in :class:`RowsMetadata`). Per layer call:
- fast path: no row belongs to a tokenzoom session, or none needs anything at this layer
  -> the platform's kernel, unchanged;
- indexed path: each row that has a modified view at this layer, or whose policy wants
  scores here (the decode query's; or, in prefill, the text queries'), is computed over
  the kept positions with the ``log m`` bias, and the scores go to its session; if other rows remain, the platform's kernel runs for the
  batch first and the indexed rows overwrite their part. On CPU the decode rows of a layer
  go to the C++ kernel in one call (per-row calls cost more Python than attention at batch 16).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from vllm_tokenzoom.ops import indexed_decode_batch, indexed_paged_attention, layout_code, runs_cpp_kernel
from vllm_tokenzoom.v1.worker.sessions import current_rows


class RowPlan(NamedTuple):
    """What one batch row needs from the indexed path at one layer."""

    row: int
    session: object  # RequestSession
    start: int  # first query token of the row in the batch
    num_queries: int
    seq_len: int
    multiplicity: torch.Tensor | None  # [nq, seq_len] or None (all ones)
    undecided: int | None  # row-local query a policy decides for here
    text: torch.Tensor | None  # row-local text queries whose scores are recorded here
    layer: int

    @property
    def is_decode(self) -> bool:
        """One query and no text scores: what the batched C++ call serves."""
        return self.num_queries == 1 and self.text is None


@dataclass(kw_only=True)
class RowsMetadata:
    """The fields a tokenzoom backend adds to its platform's attention metadata (a mixin:
    ``@dataclass class M(PlatformMetadata, RowsMetadata)``)."""

    tz_rows: list | None = None  # batch row -> session (None: fast path)
    tz_query_start_loc: torch.Tensor | None = None  # [num_reqs + 1] int, CPU
    tz_seq_lens: torch.Tensor | None = None  # [num_reqs] int, CPU


def with_rows(cls, metadata, common_attn_metadata):
    """The platform's ``metadata`` as ``cls`` (its subclass with :class:`RowsMetadata`), rows filled in."""
    return cls(**{f.name: getattr(metadata, f.name) for f in fields(metadata)}, **rows_fields(common_attn_metadata))


def rows_fields(common_attn_metadata) -> dict:
    """The :class:`RowsMetadata` fields for this step's batch (all None outside it)."""
    rows = current_rows()
    if rows is not None and len(rows) != common_attn_metadata.num_reqs:
        rows = None  # not this step's batch (a profiling or dummy run)
    if rows is None:
        return dict(tz_rows=None, tz_query_start_loc=None, tz_seq_lens=None)
    return dict(tz_rows=rows, tz_query_start_loc=common_attn_metadata.query_start_loc_cpu,
                tz_seq_lens=common_attn_metadata.seq_lens.cpu())


class IndexedRowsMixin:
    def kv_regions(self, layer, kv_cache: torch.Tensor):
        """-> (k_region, v_region [nb, Hkv, B*hs] views, k_offsets, v_offsets [B, hs])."""
        raise NotImplementedError

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        rows = getattr(attn_metadata, "tz_rows", None)
        plans = None
        if rows is not None and self.attn_type == AttentionType.DECODER:
            plans = self._plan_rows(extract_layer_index(layer.layer_name), rows, attn_metadata)
        if not plans:  # fast path: the platform's kernel, unchanged
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        num_rows = sum(1 for r in range(len(rows)) if _row_span(attn_metadata, r)[1] > 0)
        if len(plans) < num_rows:  # some rows read the cache as usual: the platform's kernel first
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        regions = self.kv_regions(layer, kv_cache)
        decode = [p for p in plans if p.is_decode] if runs_cpp_kernel(query) else []
        if len(decode) > 1:
            self._decode_rows(query, regions, attn_metadata, output, decode)
            plans = [p for p in plans if not p.is_decode]
        for plan in plans:
            self._indexed_row(query, regions, attn_metadata, output, plan)
        return output

    @staticmethod
    def _plan_rows(layer_index: int, rows, md) -> list[RowPlan]:
        """The rows that need the indexed path at this layer, with what they need."""
        plans = []
        for row, session in enumerate(rows):
            start, num_queries = _row_span(md, row)
            if session is None or num_queries == 0:
                continue
            seq_len = int(md.tz_seq_lens[row])
            first_query = seq_len - num_queries
            multiplicity = session.multiplicities(layer_index, first_query, seq_len)  # [nq, seq_len] or None
            undecided = session.undecided_query(layer_index, first_query, seq_len)
            text = session.text_queries(layer_index, first_query, seq_len)
            if multiplicity is not None or undecided is not None or text is not None:
                plans.append(RowPlan(row, session, start, num_queries, seq_len, multiplicity, undecided, text,
                                     layer_index))
        return plans

    def _decode_rows(self, query, regions, md, output, plans) -> None:
        """One decode query per plan (no text queries), all in one C++ kernel call."""
        k_region, v_region, k_offsets, v_offsets = regions
        starts = torch.tensor([p.start for p in plans])
        block_table = md.block_table[torch.tensor([p.row for p in plans])]  # [R, max_blocks]
        copies = [_key_copy(p, regions, block_table[i]) for i, p in enumerate(plans)]
        out, masses, keys = indexed_decode_batch(query[starts], k_region, v_region, k_offsets, v_offsets, block_table,
                                                 [p.seq_len for p in plans], [p.multiplicity for p in plans],
                                                 self.scale, want_mass=any(p.undecided is not None for p in plans),
                                                 key_copies=copies)
        output.index_copy_(0, starts, out.view(len(plans), *output.shape[1:]).to(output.dtype))
        for plan, mass, row_keys in zip(plans, masses or [None] * len(plans), keys):
            if plan.undecided is not None:
                plan.session.decide(plan.seq_len - 1, _all_heads(mass[0], self.num_heads), row_keys, plan.seq_len)

    def _indexed_row(self, query, regions, md, output, plan: RowPlan) -> None:
        row, session, start, num_queries, seq_len, multiplicity, undecided, text, layer_index = plan
        end = start + num_queries
        k_region, v_region, k_offsets, v_offsets = regions
        target = output[start:end]  # written in place by the kernel when it is contiguous
        direct = target.is_contiguous()
        key_copy = None
        if num_queries == 1 and runs_cpp_kernel(query):
            key_copy = _key_copy(plan, regions, md.block_table[row])
        out, mass, keys = indexed_paged_attention(query[start:end], k_region, v_region, k_offsets, v_offsets,
                                                  md.block_table[row], seq_len, multiplicity, self.scale,
                                                  want_mass=undecided is not None or text is not None,
                                                  out=target.view(query[start:end].shape) if direct else None,
                                                  key_copy=key_copy)
        if not direct:
            target.copy_(out.view(target.shape))
        if undecided is not None:
            session.decide(seq_len - num_queries + undecided, _all_heads(mass[undecided], self.num_heads), keys,
                           seq_len)
        if text is not None:
            session.record_prefill_scores(layer_index, _all_heads(mass[text], self.num_heads), keys, seq_len)


def _key_copy(plan: RowPlan, regions, block_row):
    """The session's key copy for a pruned decode query over vLLM's (transposed) CPU K, else None."""
    k_region, _, k_offsets, _ = regions
    if plan.multiplicity is None or layout_code(k_offsets, transposed_ok=True) != 2:
        return None
    return plan.session.key_copy(plan.layer, plan.seq_len - 1, k_region, k_offsets, block_row)


def _all_heads(mass: torch.Tensor, local_heads: int) -> torch.Tensor:
    """Head-averaged mass over *all* heads: with tensor parallelism each rank holds some of
    them, so the ranks' sums are all-reduced and every rank decides the same (same rows, same
    order on every rank). Not exercised here: no multi-rank test on this machine."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return mass
    return tensor_model_parallel_all_reduce(mass * local_heads) / (local_heads * world)


def _row_span(md, row: int) -> tuple[int, int]:
    start, end = int(md.tz_query_start_loc[row]), int(md.tz_query_start_loc[row + 1])
    return start, end - start
