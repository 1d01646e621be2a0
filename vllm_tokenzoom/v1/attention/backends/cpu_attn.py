"""tokenzoom's CPU attention backend: vLLM's CPU_ATTN plus the token view (DESIGN.md §4.3).

Registered as an override of ``CPU_ATTN`` (the CPU platform always picks it and ignores
``--attention-backend``). Per layer call:
- fast path: no batch row belongs to a tokenzoom session, or none needs anything at this
  layer -> the stock kernel, unchanged;
- indexed path: each row that has a modified view at this layer, or whose policy wants
  scores here, is computed over the kept positions with the ``log m`` bias, and the
  scores go to its session; if other rows remain, the stock kernel runs for the batch
  first and the indexed rows overwrite their part.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_tokenzoom.ops import indexed_paged_attention
from vllm_tokenzoom.v1.attention.backends.cpu_kv_layout import kv_offsets
from vllm_tokenzoom.v1.worker.sessions import RequestSession, current_rows


@dataclass
class TokenZoomCPUAttentionMetadata(CPUAttentionMetadata):
    tz_rows: list[RequestSession | None] | None = None  # batch row -> session (None: fast path)
    tz_query_start_loc: torch.Tensor | None = None  # [num_reqs + 1] int, CPU
    tz_seq_lens: torch.Tensor | None = None  # [num_reqs] int, CPU


class TokenZoomCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        rows = current_rows()
        if rows is not None and len(rows) != common_attn_metadata.num_reqs:
            rows = None  # not this step's batch (e.g. a profiling or dummy run)
        return TokenZoomCPUAttentionMetadata(
            **{f.name: getattr(metadata, f.name) for f in fields(CPUAttentionMetadata)},
            tz_rows=rows,
            tz_query_start_loc=common_attn_metadata.query_start_loc_cpu if rows else None,
            tz_seq_lens=common_attn_metadata.seq_lens.cpu() if rows else None,
        )


class TokenZoomCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        rows = getattr(attn_metadata, "tz_rows", None)
        plans = None
        if rows is not None and self.attn_type == AttentionType.DECODER:
            plans = self._plan_rows(extract_layer_index(layer.layer_name), rows, attn_metadata)
        if not plans:  # fast path: the stock kernel, unchanged
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        num_rows = sum(1 for r in range(len(rows)) if self._row_span(attn_metadata, r)[1] > 0)
        if len(plans) < num_rows:  # some rows read the cache as usual: stock kernel for the batch first
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        for plan in plans:
            self._indexed_row(layer, query, kv_cache, attn_metadata, output, *plan)
        return output

    @staticmethod
    def _row_span(md, row: int) -> tuple[int, int]:
        start, end = int(md.tz_query_start_loc[row]), int(md.tz_query_start_loc[row + 1])
        return start, end - start

    def _plan_rows(self, layer_index: int, rows, md) -> list[tuple]:
        """The rows that need the indexed path at this layer, with what they need."""
        plans = []
        for row, session in enumerate(rows):
            start, num_queries = self._row_span(md, row)
            if session is None or num_queries == 0:
                continue
            seq_len = int(md.tz_seq_lens[row])
            first_query = seq_len - num_queries
            multiplicity = session.multiplicities(layer_index, first_query, seq_len)  # [nq, seq_len] or None
            undecided = session.undecided_query(layer_index, first_query, seq_len)
            if multiplicity is not None or undecided is not None:
                plans.append((row, session, start, num_queries, seq_len, multiplicity, undecided))
        return plans

    def _indexed_row(self, layer, query, kv_cache, md, output, row, session, start, num_queries, seq_len,
                     multiplicity, undecided) -> None:
        end = start + num_queries
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        regions = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * self.head_size)
        k_offsets, v_offsets = kv_offsets(layer.isa, kv_cache.dtype, block_size, self.head_size)
        out, mass, keys = indexed_paged_attention(
            query[start:end], regions[:, :, 0], regions[:, :, 1], k_offsets, v_offsets,
            md.block_table[row], seq_len, multiplicity, self.scale,
        )
        output[start:end] = out.view(output[start:end].shape)
        if undecided is not None:
            session.decide(seq_len - num_queries + undecided, mass[undecided], keys, seq_len)


class TokenZoomCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return TokenZoomCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls():
        return TokenZoomCPUAttentionMetadataBuilder
