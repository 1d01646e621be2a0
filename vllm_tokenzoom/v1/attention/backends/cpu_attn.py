"""tokenzoom's CPU attention backend: vLLM's CPU_ATTN plus the token view (DESIGN.md §4.3).

Registered as an override of ``CPU_ATTN`` (the CPU platform always picks it and ignores
``--attention-backend``). The per-row logic is shared with the CUDA backend
(``indexed.py``); here: where a layer's K and V live in vLLM's CPU cache, whose K packing
depends on the ISA and is found by probing (``cpu_kv_layout.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_tokenzoom.v1.attention.backends.cpu_kv_layout import kv_offsets
from vllm_tokenzoom.v1.attention.backends.indexed import IndexedRowsMixin, StepMetadata, with_step


@dataclass
class TokenZoomCPUAttentionMetadata(CPUAttentionMetadata, StepMetadata):
    pass


class TokenZoomCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return with_step(TokenZoomCPUAttentionMetadata, self, metadata, common_attn_metadata)


class TokenZoomCPUAttentionBackendImpl(IndexedRowsMixin, CPUAttentionBackendImpl):
    def kv_regions(self, layer, kv_cache):
        # [nb, Hkv, B, 2*hs] viewed as (K region | V region) of B*hs elements per (block, head)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        regions = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * self.head_size)
        k_offsets, v_offsets = kv_offsets(layer.isa, kv_cache.dtype, block_size, self.head_size)
        return regions[:, :, 0], regions[:, :, 1], k_offsets, v_offsets


class TokenZoomCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return TokenZoomCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls():
        return TokenZoomCPUAttentionMetadataBuilder
