"""tokenzoom's CUDA attention backend: vLLM's TRITON_ATTN plus the token view.

Registered as ``AttentionBackendEnum.CUSTOM``; ``create_engine_config`` selects it (and
vLLM's V1 model runner, whose row -> request hook tokenzoom uses) when a decode-time
method is enabled on CUDA. The indexed rows run tokenzoom's Triton kernels
(``triton_kernels/indexed_attention.py``) over vLLM's cache in place.

Status, honestly: written against vLLM 0.32's ``triton_attn.py`` and the kernels are
tested (interpreter on CPU; on a GPU when one is lent), but this backend itself has not
run on a GPU: no GPU was available to the session that wrote it. CUDA graphs are off for
it (``_cudagraph_support = NEVER``): the per-row Python logic must run every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from vllm_tokenzoom.v1.attention.backends.indexed import IndexedRowsMixin, StepMetadata, with_step


@dataclass
class TokenZoomTritonAttentionMetadata(TritonAttentionMetadata, StepMetadata):
    pass


class TokenZoomTritonAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return with_step(TokenZoomTritonAttentionMetadata, self, metadata, common_attn_metadata)


class TokenZoomTritonAttentionImpl(IndexedRowsMixin, TritonAttentionImpl):
    def kv_regions(self, layer, kv_cache):
        # vLLM's Triton cache: logical [nb, Hkv, B, 2*hs], stored so that (block, slot, head)
        # rows of 2*hs are contiguous (triton_attn.py: kv_cache.transpose(1, 2).split(hs, -1)).
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        hs = self.head_size
        row = kv_cache.transpose(1, 2)  # [nb, B, Hkv, 2hs]
        slot_stride = row.stride(1)
        k_region = torch.as_strided(row, (num_blocks, num_kv_heads, block_size * hs),
                                    (row.stride(0), row.stride(2), 1), row.storage_offset())
        v_region = torch.as_strided(row, (num_blocks, num_kv_heads, block_size * hs),
                                    (row.stride(0), row.stride(2), 1), row.storage_offset() + hs)
        offsets = _row_offsets(block_size, hs, slot_stride, kv_cache.device)
        return k_region, v_region, offsets, offsets


@cache
def _row_offsets(block_size: int, head_size: int, slot_stride: int, device) -> torch.Tensor:
    """[B, hs]: element (t, d) of a block is ``t * slot_stride + d`` past its (block, head) start."""
    t, d = torch.meshgrid(torch.arange(block_size), torch.arange(head_size), indexing="ij")
    return (t * slot_stride + d).to(device)


class TokenZoomTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return TokenZoomTritonAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TokenZoomTritonAttentionMetadataBuilder
