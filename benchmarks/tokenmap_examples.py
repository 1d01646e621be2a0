"""One token-map picture per method (``python -m vllm_tokenzoom.tokenmap``), for the README.

Each method runs offline on the same video-QA test clip and question through the trained
12-layer checkpoint (``make train-videoqa-deep``; VAS needs >= 9 layers), with
``TOKENZOOM_TRACE_DIR`` set; each request's record is rendered to ``docs/tokenmaps/<name>.png``.
On this task the flashes (the 2 x 2 cells the answers are about) are what a good method keeps.

    python benchmarks/tokenmap_examples.py [--model checkpoints/videoqa-deep] [--clip 0]

``ata`` answers in one word here (no sentence ends): its example treats every token as a
sentence end and adjusts 100 entries a step, to show what it does. ``voa`` chooses 4
keyframes after 4 tokens (its second pass is drawn: the overview, then the keyframes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from vllm_tokenzoom import tokenmap
from vllm_tokenzoom.testing import videoqa
from vllm_tokenzoom.testing.offline import run_offline

OUT = Path(__file__).resolve().parent.parent / "docs" / "tokenmaps"


def examples(vocab: int) -> dict[str, dict]:
    every_token = {"every": 1, "copies": 100, "drops": 100, "sentence_end_ids": list(range(vocab))}
    return {
        "ttm": {"preset": "ttm"},
        "fastv": {"preset": "fastv"},
        "vas": {"preset": "vas"},
        "dycoke": {"preset": "dycoke"},
        "cascade": {"preset": "cascade"},
        "ata": {"methods": {"ata": every_token}},
        # the answer is a word: the keyframes are chosen after 4 tokens, not ZoomVLM's 20
        "voa": {"methods": {"voa": {"probe_tokens": 4, "keyframes": 4}}},
        "random_drop": {"methods": {"random_drop": {"keep_ratio": 0.3}}},
        "frame_sampling": {"methods": {"frame_sampling": {"keep_ratio": 0.3}}},
        "spatial_pool": {"methods": {"spatial_pool": {"keep_ratio": 0.25}}},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/videoqa-deep")
    ap.add_argument("--clip", type=int, default=0, help="which test clip")
    ap.add_argument("--tokens", type=int, default=8, help="tokens generated (ignore_eos)")
    ap.add_argument("--only", help="comma-separated example names (default: all)")
    args = ap.parse_args(argv)
    seed = videoqa.split_seeds("test", args.clip + 1)[args.clip]
    clip = videoqa.make_clip(seed, render=False)
    question = videoqa.questions(clip)[0]
    vocab = json.loads((Path(args.model) / "config.json").read_text())["text_config"]["vocab_size"]
    request = dict(videoqa_clip=seed, question=question.text, max_tokens=args.tokens)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, config in examples(vocab).items():
        if args.only and name not in args.only.split(","):
            continue
        where = Path(tempfile.mkdtemp(prefix="tokenmap-"))
        result = run_offline(args.model, [request], {"tokenzoom": config}, env={"TOKENZOOM_TRACE_DIR": str(where)})
        # one record per engine request: VOA's are two passes, the second (the longer prompt) is drawn
        records = [json.loads(p.read_text()) for p in where.glob("*.json")]
        record = max(records, key=lambda r: r["num_prompt_tokens"])
        record["request_id"] = (f"{name}, clip {seed}: {question.text!r} -> "
                               f"{result['outputs'][0]['text'].strip()!r} (truth: {question.answer!r})")
        print(tokenmap.render(record, OUT / f"{name}.png"), flush=True)
        shutil.rmtree(where)


if __name__ == "__main__":
    main()
