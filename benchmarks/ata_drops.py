"""Which visual tokens ZoomVLM's ATA deletes on the video-QA ``describe`` kind: the dense
reference (HF + plain torch, ``reference/ata.py``) with ATA's drops only (0 copies, 10 drops,
every 3 sentences) against full tokens, on the first N test clips of
``checkpoints/videoqa-deep-describe``; per clip, whether the answer changed and how many of the
flashes' tokens (4 per flash) the adjustments inside the answer deleted.

    python benchmarks/ata_drops.py 40 > benchmarks/results/ata_drops_describe.txt
"""
import sys, torch
from vllm_tokenzoom.reference.llava_onevision import DenseLlavaOnevision
from vllm_tokenzoom.methods.ata import ATA
from vllm_tokenzoom.testing import videoqa
from vllm_tokenzoom.testing.video import chat_prompt
torch.set_num_threads(1)
dense = DenseLlavaOnevision("checkpoints/videoqa-deep-describe")
tok = dense.processor.tokenizer
eos = tok.convert_tokens_to_ids("<|im_end|>")
n = int(sys.argv[1])
stats = dict(clips=0, changed=0, adj=0, deleted=0, flash_deleted=0, flash_deleted_clips=0, changed_with_flash=0)
for s in videoqa.split_seeds("test", n):
    clip = videoqa.make_clip(s)
    q = [x for x in videoqa.questions(clip) if x.kind == "describe"][0]
    prompt = chat_prompt(tok, q.text)
    full = dense.generate(clip.frames, prompt, max_new_tokens=20)
    ata = dense.generate(clip.frames, prompt, max_new_tokens=20, ata=ATA(copies=0, drops=10))
    a, b = full.tokens[-20:], ata.tokens[-20:]
    end = a.index(eos) if eos in a else len(a)
    flash = {f.frame * 196 + (f.row + dr) * 14 + f.col + dc for f in clip.flashes for dr in (0, 1) for dc in (0, 1)}
    hit = 0
    for pos, copied, deleted in ata.traces["ata"]:
        if pos - full.num_prompt_tokens <= end:
            stats["adj"] += 1; stats["deleted"] += len(deleted)
            hit += len(set(map(int, deleted)) & flash)
    changed = a[:end + 1] != b[:end + 1]
    stats["clips"] += 1; stats["changed"] += changed; stats["flash_deleted"] += hit
    stats["flash_deleted_clips"] += hit > 0; stats["changed_with_flash"] += changed and hit > 0
    print(s, len(clip.flashes), "changed" if changed else "same", "flash tokens deleted", hit,
          repr(tok.decode(a[:end])), "->", repr(tok.decode(b[:end])), flush=True)
print(stats)
