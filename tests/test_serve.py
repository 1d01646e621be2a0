"""The served path: `vllm serve DIR --plugin tokenzoom` (DyCoke: TTM + dynamic pruning), the
official `openai` client, video files and data URLs, concurrency, aborts and bad requests."""
import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokenzoom.methods.dp import DP
from vllm_tokenzoom.methods.ttm import TTM
from vllm_tokenzoom.testing.server import cpu_serve_args, data_url, kept_source, released, video_message, vllm_server
from vllm_tokenzoom.testing.video import make_video, read_video, write_mp4

QUESTION = "Describe what happens in this video."
TTM_, DP_ = TTM(prune_ratio=0.7), DP(layer=3, prune_ratio=0.7)  # what `--plugin tokenzoom` means
MAX_MODEL_LEN = 2048  # a 16-frame video fits only after TTM: 3192 prompt tokens vanilla, 1536 with TTM


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [write_mp4(make_video(16, seed=40 + i), folder / f"v{i}.mp4") for i in range(3)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return tmp_path_factory.mktemp("records")


@pytest.fixture(scope="module")
def server(tiny_model, videos, records):
    args = cpu_serve_args(tiny_model, num_frames=16, media_dir=str(videos[0].parent))
    args[args.index("--max-model-len") + 1] = str(MAX_MODEL_LEN)
    with vllm_server(args + ["--plugin", "tokenzoom"], env={"TOKENZOOM_TRACE_DIR": str(records)}) as (url, log):
        yield url, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="EMPTY")


def ask(client, url, max_tokens=8, question=QUESTION, setting=None, **extra):
    """``setting``: the request's own tokenzoom config (sent as JSON in ``vllm_xargs``)."""
    if setting is not None:
        extra["vllm_xargs"] = {"tokenzoom": setting if isinstance(setting, str) else json.dumps(setting)}
    return client.chat.completions.create(model=client.models.list().data[0].id, temperature=0.0,
                                          max_tokens=max_tokens, messages=video_message(url, question),
                                          extra_body={"return_token_ids": True, **extra})


def token_ids(reply) -> list[int]:
    return reply.choices[0].model_extra["token_ids"]


def reference(dense, records, reply, video, prompt):
    """The dense reference of a served reply, run on the engine's TTM choice, which must be the
    reference's own up to rounding ties (``DenseLlavaOnevision.engine_ttm``)."""
    frames = read_video(video)
    return dense.generate(frames, prompt, dense.engine_ttm(frames, TTM_, kept_source(records, reply.id)), 8, dp=DP_)


def test_video_chat_matches_the_reference(client, videos, dense, prompt, records):
    reply = ask(client, data_url(videos[0]))
    ref = reference(dense, records, reply, videos[0], prompt)
    assert reply.usage.prompt_tokens == ref.num_prompt_tokens
    text_tokens = len(dense.processor.tokenizer(prompt).input_ids) - 1
    assert reply.usage.prompt_tokens == text_tokens + TTM_.num_kept_tokens(16, 196) + 1
    assert token_ids(reply) == ref.tokens
    assert reply.choices[0].message.content  # the text is there too


def test_concurrent_requests_answer_as_alone(client, videos, dense, prompt, records):
    urls = [data_url(v) for v in videos] + ["file://" + str(v) for v in videos]
    with ThreadPoolExecutor(len(urls)) as pool:
        replies = list(pool.map(lambda u: ask(client, u), urls))
    alone = [reference(dense, records, r, v, prompt).tokens for r, v in zip(replies, videos + videos)]
    assert [token_ids(r) for r in replies] == alone


def test_bad_requests_get_errors_and_the_server_lives_on(client, videos, server):
    with pytest.raises(openai.BadRequestError):
        ask(client, "data:video/mp4;base64," + "bm90IGEgdmlkZW8=" * 10)  # "not a video"
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
        ask(client, data_url(videos[1]), question=" red" * 600)  # video + text over the limit
    assert ask(client, data_url(videos[1])).usage.prompt_tokens < MAX_MODEL_LEN


def test_a_request_chooses_its_own_compression(client, videos, dense, prompt, records):
    """vllm_xargs {"tokenzoom": "<JSON>"}: TTM at K=0.5 for this request only (its own setting
    replaces the server's dycoke), the next plain request the server's default."""
    ttm = TTM(prune_ratio=0.5)
    text_tokens = len(dense.processor.tokenizer(prompt).input_ids) - 1
    reply = ask(client, data_url(videos[2]), setting={"methods": {"ttm": {"prune_ratio": 0.5}}})
    ref = dense.generate(read_video(videos[2]), prompt, ttm, max_new_tokens=8)
    assert reply.usage.prompt_tokens == ref.num_prompt_tokens == text_tokens + ttm.num_kept_tokens(16, 196) + 1
    assert token_ids(reply) == ref.tokens
    plain = ask(client, data_url(videos[2]))  # the same video: no cache may hand it the K=0.5 placeholders
    assert plain.usage.prompt_tokens == text_tokens + TTM_.num_kept_tokens(16, 196) + 1
    assert token_ids(plain) == reference(dense, records, plain, videos[2], prompt).tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_per_request_setting_is_a_400_naming_it(client, videos, stream):
    url = data_url(videos[1])
    with pytest.raises(openai.BadRequestError, match=r"prune_ratio = 1\.5 is out of range"):
        ask(client, url, setting={"methods": {"ttm": {"prune_ratio": 1.5}}}, stream=stream)
    with pytest.raises(openai.BadRequestError, match="not valid JSON"):
        ask(client, url, setting='{"methods": ', stream=stream)
    # fastv prefills each prompt in one step; this server (dycoke) runs chunked prefill
    with pytest.raises(openai.BadRequestError, match="'fastv' need each prompt prefilled in one step"):
        ask(client, url, setting={"preset": "fastv"}, stream=stream)
    with pytest.raises(openai.BadRequestError, match="vllm_xargs.tokenzoom"):
        ask(client, url, mm_processor_kwargs={"tokenzoom": '{"preset": "ttm"}'}, stream=stream)
    assert ask(client, url).usage.prompt_tokens < MAX_MODEL_LEN  # and the server lives on


def kv_usage(server) -> list[float]:
    with urllib.request.urlopen(server[0] + "/metrics") as r:
        metrics = r.read().decode()
    return [float(v) for v in re.findall(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", metrics, re.M)]


def test_abort_mid_decode(client, videos, server, records):
    """The client goes away mid-decode: vLLM aborts the request, tokenzoom drops its session
    (its record is written then, with the decode steps it ran), the next request is served, and
    no KV block is left held."""
    stream = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0.0, max_tokens=200,
                                            messages=video_message(data_url(videos[2]), QUESTION), stream=True)
    for i, chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away: vLLM aborts the request
    record = released(records, chunk.id)
    assert record is not None, "the aborted request's session was never dropped"
    assert 2 <= len(record["decisions"]["dp"]) < 199  # it stopped mid-decode
    assert ask(client, data_url(videos[2])).usage.completion_tokens == 8
    usage = kv_usage(server)  # the aborted request's blocks came back too
    assert usage and all(u == 0.0 for u in usage)


def test_no_kv_blocks_or_sessions_held_after_requests(client, videos, server, records):
    """After requests (this test sends its own, so it cannot pass vacuously): vLLM's KV usage
    is 0 and every request's session was dropped (its record written)."""
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda v: ask(client, data_url(v)), videos))
    assert all(released(records, r.id) is not None for r in replies)
    usage = kv_usage(server)
    assert usage and all(u == 0.0 for u in usage)
    assert "stock attention" not in server[1].read_text()  # no step ran unpruned (step._warn_unbound)


def test_plugin_registered_in_every_engine_process(server):
    log = server[1].read_text()
    assert re.search(r"\(APIServer pid=\d+\).*tokenzoom enabled: .*'prune_ratio': 0.7", log)
    for process in ("EngineCore", "VllmWorker"):
        assert re.search(rf"\({process}[-\w]* pid=\d+\).*tokenzoom 0\.1\.0 registered", log), process


def test_a_served_request_leaves_a_token_map_record(client, videos, records, tmp_path):
    """With TOKENZOOM_TRACE_DIR, the worker writes each request's record when it ends; the
    token-map command renders it."""
    from vllm_tokenzoom import tokenmap

    reply = ask(client, data_url(videos[1]), max_tokens=6)
    record = released(records, reply.id)
    (path,) = records.glob(f"{reply.id}*.json")
    assert len(record["position"]) == TTM_.num_kept_tokens(16, 196) and list(record["methods"]) == ["dp"]
    assert len(record["decisions"]["dp"]) == 5  # one selection per decode step
    tokenmap.main([str(path), "--out", str(tmp_path / "map.png")])
    assert (tmp_path / "map.png").stat().st_size > 0


def metric(server, name: str, method: str) -> float:
    with urllib.request.urlopen(server[0] + "/metrics") as r:
        metrics = r.read().decode()
    found = re.findall(rf'^{re.escape(name)}\{{[^}}]*method="{method}"[^}}]*\}} (\S+)$', metrics, re.M)
    return float(found[0]) if found else 0.0


def test_metrics_count_each_request_s_visual_tokens(client, videos, server):
    """/metrics: tokenzoom:visual_tokens_in_total and _kept_total grow by exactly one request's
    counts (16 frames x 196 in; TTM K=0.7 keeps its count), labelled by the pre-LLM method;
    a repeated video (the processor cache sends it without pixels) counts the same."""
    names = ("tokenzoom:visual_tokens_in_total", "tokenzoom:visual_tokens_kept_total")
    for _ in range(2):
        before = [metric(server, n, "ttm") for n in names]
        ask(client, data_url(videos[0]))
        after = [metric(server, n, "ttm") for n in names]
        assert [b - a for a, b in zip(before, after)] == [16 * 196, TTM_.num_kept_tokens(16, 196)]


def test_metrics_and_the_reply_carry_the_in_llm_figures(client, videos, server):
    """One dycoke request of 8 tokens: its 7 decode steps each read, on the 4-layer model, all of
    TTM's kept tokens in layers 0-2 and dp's int(0.3 V) in layer 3; /metrics' histogram of that
    share grows by exactly those 7 observations (label: the request's decode methods), the policy
    time histogram by one decision per step, and the reply's kv_transfer_params carry the totals."""
    kept = TTM_.num_kept_tokens(16, 196)
    share = (3 * kept + int(kept * 0.3)) / (4 * kept)
    names = ("tokenzoom:decode_visual_attended_ratio_count", "tokenzoom:decode_visual_attended_ratio_sum",
             "tokenzoom:policy_seconds_count")
    before = [metric(server, n, "dp") for n in names]
    reply = ask(client, data_url(videos[1]))
    after = [metric(server, n, "dp") for n in names]
    assert after[0] - before[0] == 7
    assert after[1] - before[1] == pytest.approx(7 * share, rel=1e-9)
    assert after[2] - before[2] >= 7
    figures = reply.model_extra["kv_transfer_params"]["tokenzoom"]["figures"]
    assert figures["decode_steps"] == 7 and figures["decode_visual_attended_ratio"] == round(share, 4)
    assert figures["prefill_visual_rows_skipped"] == 0 and figures["policy_seconds"] > 0
