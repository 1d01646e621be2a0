"""Prefill-stage methods served: `vllm serve DIR --plugin tokenzoom --additional-config {...}` with
FastV (alone, after TTM, with TTM and dp) and VAS (the `vas` and `cascade` presets) answers
concurrent video chats through the `openai` client, each reply equal to that request alone
(the dense reference), and holds no KV afterwards."""
import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokenzoom.config import PRESETS, parse_config
from vllm_tokenzoom.testing.server import cpu_serve_args, data_url, kept_source, video_message, vllm_server
from vllm_tokenzoom.testing.video import chat_prompt, make_video, read_video, write_mp4

FASTV = {"fastv": {"layer": 2, "prune_ratio": 0.5}}
SETTINGS = {  # name -> (model, the tokenzoom config); VAS's defaults need more than tiny's 4 layers
    "fastv": ("tiny", {"methods": FASTV}),
    "ttm+fastv": ("tiny", {"methods": {"ttm": {}, **FASTV}}),
    "ttm+fastv+dp": ("tiny", {"methods": {"ttm": {}, **FASTV, "dp": {}}}),
    "vas": ("tiny-deep", {"preset": "vas"}),
    "cascade": ("tiny-deep", {"preset": "cascade"}),
}
assert set(PRESETS["cascade"]) == {"ttm", "vas", "dp"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [write_mp4(make_video(16, seed=40 + i), folder / f"v{i}.mp4") for i in range(3)]


@pytest.fixture(scope="module", params=list(SETTINGS))
def served(request, videos, tmp_path_factory):
    model, config = SETTINGS[request.param]
    deep = model == "tiny-deep"
    model_dir = request.getfixturevalue("tiny_deep_model" if deep else "tiny_model")
    dense = request.getfixturevalue("dense_deep" if deep else "dense")
    args = cpu_serve_args(model_dir, num_frames=16) + [
        "--plugin", "tokenzoom", "--additional-config", json.dumps({"tokenzoom": config})]
    records = tmp_path_factory.mktemp("records")
    with vllm_server(args, env={"TOKENZOOM_TRACE_DIR": str(records)}) as (url, _log):
        yield url, dense, dict(parse_config({"tokenzoom": config}).methods), records


def test_concurrent_video_chats_answer_as_alone(served, videos):
    url, dense, policies, records = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id

    def ask(video):
        return client.chat.completions.create(model=model, temperature=0.0, max_tokens=8,
                                              messages=video_message(data_url(video), "Describe what happens."),
                                              extra_body={"return_token_ids": True})

    with ThreadPoolExecutor(len(videos)) as pool:
        replies = list(pool.map(ask, videos))
    question = chat_prompt(dense.processor.tokenizer, "Describe what happens.")
    alone = []
    for reply, video in zip(replies, videos):
        frames, own = read_video(video), dict(policies)
        if "ttm" in own:  # the engine's TTM choice, the reference's own up to rounding ties
            own["ttm"] = dense.engine_ttm(frames, own["ttm"], kept_source(records, reply.id))
        alone.append(dense.generate(frames, question, max_new_tokens=8, **own).tokens)
    assert [r.choices[0].model_extra["token_ids"] for r in replies] == alone
    with urllib.request.urlopen(url + "/metrics") as r:
        usage = [float(v) for v in re.findall(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", r.read().decode(), re.M)]
    assert usage and all(u == 0.0 for u in usage)
