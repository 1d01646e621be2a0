"""The vision path's output kept between the passes of a request, so that each frame goes through
the tower once per request (ZoomVLM §4.2: VOA's second pass re-reads the overview's frames, and
its keyframes are among them).

Keyed by content: a digest of the frames' pixels and which frames were encoded, so a hit is
exactly what the tower would compute again (any request, any pass). A first pass *keeps* its
output; the second *takes* it (and so frees it). Entries of requests that never reach a second
pass (an answer within the probe's tokens, an abort) age out: the memo is bounded in bytes and
drops its oldest entries first. Held in host memory (never on the accelerator, whose free memory
vLLM has already given to the KV cache).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

MAX_BYTES = 1 << 30  # per worker process: about 70 overview passes of 22 frames at 896 wide, fp32


def key_of(pixels: torch.Tensor, used: list[int] | None) -> str:
    """pixels: [T, C, H, W] one video's frames as the processor gave them; used: the frames encoded."""
    chosen = pixels if used is None else pixels[torch.tensor(used, device=pixels.device)]
    data = chosen.detach().contiguous().cpu().view(torch.uint8).numpy()
    digest = hashlib.sha1(data, usedforsecurity=False)
    digest.update(repr((tuple(pixels.shape), str(pixels.dtype), used)).encode())
    return digest.hexdigest()


class TowerMemo:
    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def keep(self, key: str, features: torch.Tensor) -> None:
        """features: [F * N + 1, D] the vision path's output for one video."""
        self.take(key)
        kept = features.detach().to("cpu", copy=True)
        size = kept.numel() * kept.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = kept
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def take(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        kept = self.entries.pop(key, None)
        if kept is None:
            return None
        self.bytes -= kept.numel() * kept.element_size()
        return kept.to(device)
