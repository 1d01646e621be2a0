"""Which visual tokens ZoomVLM's ATA deletes on the video-QA ``describe`` kind: the dense
reference (HF + plain torch, ``reference/ata.py``) with ATA's drops only (0 copies, 10 drops,
every 3 sentences) against full tokens, on the first N test clips of
``checkpoints/videoqa-deep-describe``; per clip, whether the answer changed and how many of the
flashes' tokens (4 per flash) the adjustments inside the answer deleted.

    python benchmarks/ata_drops.py 40 > benchmarks/results/ata_drops_describe.txt
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from vllm_tokenzoom.methods.ata import ATA
from vllm_tokenzoom.reference.llava_onevision import DenseLlavaOnevision
from vllm_tokenzoom.testing import videoqa
from vllm_tokenzoom.testing.video import chat_prompt

GRID, TOKENS = videoqa.GRID, 20  # token cells per frame side; tokens generated per answer


def flash_indices(clip: videoqa.Clip) -> set[int]:
    """The visual indices (frame * 196 + cell) of every flash's 2x2 token cells."""
    return {f.frame * GRID * GRID + (f.row + dr) * GRID + f.col + dc
            for f in clip.flashes for dr in (0, 1) for dc in (0, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", type=int, help="the first N test clips")
    ap.add_argument("--model", default="checkpoints/videoqa-deep-describe")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dense = DenseLlavaOnevision(args.model)
    tok = dense.processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    stats = Counter(clips=0, changed=0, adj=0, deleted=0, flash_deleted=0, flash_deleted_clips=0, changed_with_flash=0)
    for seed in videoqa.split_seeds("test", args.clips):
        clip = videoqa.make_clip(seed)
        (q,) = [x for x in videoqa.questions(clip) if x.kind == "describe"]
        prompt = chat_prompt(tok, q.text)
        full = dense.generate(clip.frames, prompt, max_new_tokens=TOKENS)
        ata = dense.generate(clip.frames, prompt, max_new_tokens=TOKENS, ata=ATA(copies=0, drops=10))
        a, b = full.tokens[-TOKENS:], ata.tokens[-TOKENS:]  # the generated tokens (EOS ignored)
        end = a.index(eos) if eos in a else len(a)
        flash, hit = flash_indices(clip), 0
        for position, _, deleted in ata.traces["ata"]:
            if position - full.num_prompt_tokens <= end:  # an adjustment inside the answer
                stats.update(adj=1, deleted=len(deleted))
                hit += len(set(map(int, deleted)) & flash)
        changed = a[:end + 1] != b[:end + 1]
        stats.update(clips=1, changed=changed, flash_deleted=hit, flash_deleted_clips=hit > 0,
                     changed_with_flash=changed and hit > 0)
        print(seed, len(clip.flashes), "changed" if changed else "same", "flash tokens deleted", hit,
              repr(tok.decode(a[:end])), "->", repr(tok.decode(b[:end])), flush=True)
    print(dict(stats))


if __name__ == "__main__":
    main()
