"""The `zoomvlm` preset served: `vllm serve DIR --plugin tokenzoom --additional-config
'{"tokenzoom": {"preset": "zoomvlm"}}'` answers 32-frame video chats through the `openai`
client, one request in and one answer out (two passes inside), streamed and not with the
same text, each equal to the dense reference alone, concurrent ones too; aborted in either
pass, nothing stays behind: KV usage back to 0, every session dropped."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokenzoom.methods import ATA, VOA
from vllm_tokenzoom.reference import voa as voa_reference
from vllm_tokenzoom.testing.server import cpu_serve_args, data_url, released, video_message, vllm_server
from vllm_tokenzoom.testing.video import chat_prompt, make_video, read_video, write_mp4

from .test_serve import kv_usage

QUESTION = "Describe what happens in this video."
MAX_TOKENS = 28  # s = 20 from the overview, then 8 with the keyframes


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [write_mp4(make_video(32, seed=60 + i), folder / f"v{i}.mp4") for i in range(3)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return tmp_path_factory.mktemp("records")


@pytest.fixture(scope="module")
def server(tiny_deep_model, records):
    # vLLM sizes its encoder cache (for one video's tokens) by --max-num-batched-tokens, or 16 frames:
    # VOA's second pass (22 x 100 + 10 x 196 + 1 = 4161 tokens) needs more
    args = cpu_serve_args(tiny_deep_model, num_frames=32) + ["--max-num-batched-tokens", "8192"]
    args += [
        "--plugin", "tokenzoom", "--additional-config", json.dumps({"tokenzoom": {"preset": "zoomvlm"}})]
    with vllm_server(args, env={"TOKENZOOM_TRACE_DIR": str(records)}) as (url, log):
        yield url, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="EMPTY")


@pytest.fixture(scope="module")
def reference(dense_deep):
    """The paper's defaults (32 frames -> 22-frame overview at 10 x 10, k = 10, s = 20), ATA every 3 sentences."""
    prompt, cache = chat_prompt(dense_deep.processor.tokenizer), {}

    def of(video):
        if video not in cache:
            cache[video] = voa_reference.generate(dense_deep, read_video(video), prompt, VOA(), MAX_TOKENS, ata=ATA())
        return cache[video]

    return of


def ask(client, video, stream=False, max_tokens=MAX_TOKENS):
    return client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0.0, max_tokens=max_tokens, stream=stream,
        messages=video_message(data_url(video), QUESTION),
        **({"stream_options": {"include_usage": True}} if stream else {"extra_body": {"return_token_ids": True}}))


def test_streamed_and_not_answer_the_same_as_the_reference(client, videos, reference, dense_deep):
    ref = reference(videos[0])
    assert ref.traces["voa"] and len(ref.traces["voa"][0][1]) == 10  # the second pass ran, with 10 keyframes
    reply = ask(client, videos[0])
    assert reply.choices[0].model_extra["token_ids"] == ref.tokens
    # usage counts both passes: 22 x 100 (+1) overview tokens, then + 10 x 196 and the 20 tokens
    text = len(dense_deep.processor.tokenizer(chat_prompt(dense_deep.processor.tokenizer)).input_ids) - 1
    assert reply.usage.prompt_tokens == ref.num_prompt_tokens == (text + 2201) + (text + 4161 + 20)
    assert reply.usage.completion_tokens == MAX_TOKENS
    chunks = list(ask(client, videos[0], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_concurrent_requests_answer_as_alone(client, videos, reference):
    with ThreadPoolExecutor(len(videos)) as pool:
        replies = list(pool.map(lambda v: ask(client, v).choices[0].model_extra["token_ids"], videos))
    assert replies == [reference(v).tokens for v in videos]


def test_an_answer_within_s_tokens_is_the_first_pass(client, videos, reference):
    reply = ask(client, videos[1], max_tokens=5)
    assert reply.choices[0].model_extra["token_ids"] == reference(videos[1]).tokens[:5]
    assert reply.usage.prompt_tokens < 2400  # the overview's prompt only


@pytest.mark.parametrize("chunks", [3, MAX_TOKENS - 3], ids=["first pass", "second pass"])
def test_abort_in_either_pass_leaves_nothing_behind(client, videos, server, records, chunks):
    stream = ask(client, videos[2], stream=True, max_tokens=200)
    for i, chunk in enumerate(stream):
        if i == chunks:
            break
    stream.close()  # the client goes away: the pass running is aborted, no second pass starts
    assert released(records, chunk.id) is not None
    time.sleep(2.0)
    usage = kv_usage(server)
    assert usage and all(u == 0.0 for u in usage)
    assert ask(client, videos[1], max_tokens=5).usage.completion_tokens == 5  # and the server serves on
