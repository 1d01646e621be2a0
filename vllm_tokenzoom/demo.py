"""The main job on the embedded tiny model (``make demo``).

Serves a LLaVA-OneVision checkpoint with ``vllm serve MODEL --plugin tokenzoom``, sends a
16-frame video chat completion through the official ``openai`` client, prints the visual
token count of vanilla vLLM against tokenzoom's and the reply, then stops the server.

    python -m vllm_tokenzoom.demo --model models/tiny [--frames 16] [--additional-config JSON]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/tiny", help="LLaVA-OneVision checkpoint directory")
    ap.add_argument("--frames", type=int, default=16, help="frames in the demo video (default 16)")
    ap.add_argument("--additional-config", default=None,
                    help="tokenzoom config as JSON, e.g. '{\"tokenzoom\": {\"methods\": {\"ttm\": {\"prune_ratio\": 0.5}}}}'")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    from openai import OpenAI

    from vllm_tokenzoom.config import parse_config
    from vllm_tokenzoom.patches import enable_in
    from vllm_tokenzoom.testing.server import cpu_serve_args, data_url, video_message, vllm_server
    from vllm_tokenzoom.testing.video import make_video, write_mp4

    additional = json.loads(args.additional_config) if args.additional_config else {}
    ttm = parse_config(enable_in(additional)).ttm
    video = Path(tempfile.mkdtemp()) / "demo.mp4"
    write_mp4(make_video(args.frames, seed=0), video)
    serve = cpu_serve_args(args.model, num_frames=args.frames) + ["--plugin", "tokenzoom"]
    if additional:
        serve += ["--additional-config", json.dumps(additional)]
    print("$ vllm serve " + " ".join(serve), flush=True)
    t0 = time.perf_counter()
    with vllm_server(serve) as (url, _log):
        print(f"server up in {time.perf_counter() - t0:.0f} s at {url}", flush=True)
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
        reply = client.chat.completions.create(
            model=args.model, messages=video_message(data_url(video), "Describe what happens in this video."),
            temperature=0.0, max_tokens=args.max_tokens,
        )
    per_frame = 196
    vanilla = args.frames * per_frame + 1
    kept = (ttm.num_kept_tokens(args.frames, per_frame) if ttm else args.frames * per_frame) + 1
    text_tokens = reply.usage.prompt_tokens - kept
    print(f"video: {args.frames} frames x {per_frame} tokens + 1 newline")
    print(f"visual tokens   vanilla vLLM: {vanilla:5d}   tokenzoom ({_describe(ttm)}): {kept:5d}  "
          f"({kept / vanilla:.1%})")
    print(f"prompt tokens   vanilla vLLM: {vanilla + text_tokens:5d}   tokenzoom (usage.prompt_tokens): "
          f"{reply.usage.prompt_tokens:5d}")
    print(f"reply ({reply.usage.completion_tokens} tokens; a random tiny model talks nonsense): "
          f"{reply.choices[0].message.content!r}")


def _describe(ttm) -> str:
    return f"TTM K={ttm.prune_ratio}, {ttm.variant}" if ttm else "no pre-LLM method"


if __name__ == "__main__":
    main()
