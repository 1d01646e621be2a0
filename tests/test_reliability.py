"""Reliability against a live ``vllm serve --plugin tokenzoom`` (raw HTTP and the ``openai``
client): bad and edge inputs each get a clear 4xx naming what was wrong (or a correct answer),
the server lives on, and nothing is left behind (KV blocks, tokenzoom sessions, tracebacks).
The long mixed-request soak is ``benchmarks/soak.py``; its short run is here too."""
import base64
import json
import re
import urllib.error
import urllib.request

import openai
import pytest

from vllm_tokenzoom.testing.server import cpu_serve_args, video_message, vllm_server
from vllm_tokenzoom.testing.video import make_video, write_mp4

MAX_MODEL_LEN = 4096
SERVER_CONFIG = {"tokenzoom": {"preset": "dycoke", "per_request": ["ttm", "dp", "fastv", "ata"]}}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    good = write_mp4(make_video(16, seed=60), folder / "good.mp4")
    for n in (1, 2, 3, 5, 64):
        write_mp4(make_video(n, seed=61 + n), folder / f"frames{n}.mp4")
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(good.read_bytes()[:4000])
    (folder / "text.mp4").write_text("this is not a video\n")
    (folder / "dir.mp4").mkdir()
    return folder


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return tmp_path_factory.mktemp("records")


@pytest.fixture(scope="module")
def server(tiny_model, media, records):
    args = cpu_serve_args(tiny_model, num_frames=16, media_dir=str(media))
    args[args.index("--max-model-len") + 1] = str(MAX_MODEL_LEN)
    args += ["--plugin", "tokenzoom", "--additional-config", json.dumps(SERVER_CONFIG), "--served-model-name", "tiny"]
    with vllm_server(args, env={"TOKENZOOM_TRACE_DIR": str(records)}) as (url, log):
        yield url, log


def post(server, body, path="/v1/chat/completions", raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server[0] + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def chat(url: str | None = "file:good.mp4", text="What happens?", media_dir=None, **extra) -> dict:
    if url is not None and url.startswith("file:") and not url.startswith("file:///"):
        url = f"file://{media_dir}/{url[5:]}"
    content = ([{"type": "video_url", "video_url": {"url": url}}] if url is not None else []) + \
        [{"type": "text", "text": text}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0.0, **extra}


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def cases(media):
    """(kind, request body, expected status, a fragment the error message must hold)."""
    c = lambda *a, **k: chat(*a, media_dir=media, **k)  # noqa: E731
    video = c()["messages"][0]["content"][0]
    return [
        # broken, truncated, empty and mislabelled videos
        ("not a video (data URL)", c("data:video/mp4;base64," + base64.b64encode(b"not a video" * 50).decode()), 400, "video"),
        ("truncated mp4", c("file:truncated.mp4"), 400, "video"),
        ("empty file", c("file:empty.mp4"), 400, "video"),
        ("text file named .mp4", c("file:text.mp4"), 400, "video"),
        ("a directory named .mp4", c("file:dir.mp4"), 400, "is a directory"),
        ("mp4 labelled webm", c("data:video/webm;base64," + b64(media / "good.mp4")), 200, None),
        ("mp4 labelled as an image", c("data:image/png;base64," + b64(media / "good.mp4")), 200, None),
        ("one-frame mp4 (no decodable frame)", c("file:frames1.mp4"), 400, "no decodable frame"),
        ("2 frames", c("file:frames2.mp4"), 200, None),
        ("3 frames", c("file:frames3.mp4"), 200, None),
        ("5 frames", c("file:frames5.mp4"), 200, None),
        ("64 frames (16 sampled)", c("file:frames64.mp4"), 200, None),
        # URLs
        ("bad base64", c("data:video/mp4;base64,@@@@"), 400, "base64"),
        ("data URL not base64", c("data:video/mp4,abcd"), 501, ""),
        ("file outside the allowed path", c("file:///etc/passwd"), 400, "allowed-local-media-path"),
        ("missing file", c("file:nope.mp4"), 400, "no such file"),
        ("refused connection", c("http://127.0.0.1:9/x.mp4"), 400, "connection failed"),
        ("unresolvable host", c("http://no-such-host.invalid/x.mp4"), 400, "cannot be resolved"),
        ("ftp URL", c("ftp://example.com/x.mp4"), 400, "HTTP, data or file URL"),
        ("empty URL", c(""), 400, ""),
        # more media than allowed
        ("two videos (limit 1)", {**c(), "messages": [{"role": "user", "content": [video, video, {"type": "text", "text": "?"}]}]},
         400, "video"),
        ("an image (limit 0)", {**c(None), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png()}}, {"type": "text", "text": "?"}]}]},
         400, "image"),
        # lengths and sampling parameters
        ("over-long prompt", c(text=" red" * 4000), 400, str(MAX_MODEL_LEN)),
        ("max_tokens over the context", c(max_tokens=10 ** 6), 400, "max_tokens"),
        ("max_tokens 0", c(max_tokens=0), 400, "max_tokens"),
        ("negative temperature", c(temperature=-1.0), 400, "temperature"),
        ("top_p 2", c(top_p=2.0), 400, "top_p"),
        ("n 0", c(n=0), 400, "n"),
        ("unknown model", {**c(), "model": "nope"}, 404, "nope"),
        ("no messages", {"model": "tiny", "max_tokens": 4}, 400, "messages"),
        ("empty messages", {"model": "tiny", "messages": [], "max_tokens": 4}, 400, ""),
        # per-request tokenzoom settings
        ("tokenzoom value out of range", c(vllm_xargs={"tokenzoom": '{"methods": {"ttm": {"prune_ratio": 1.5}}}'}),
         400, "prune_ratio = 1.5 is out of range"),
        ("tokenzoom not JSON", c(vllm_xargs={"tokenzoom": '{"methods": '}), 400, "not valid JSON"),
        ("tokenzoom unknown method", c(vllm_xargs={"tokenzoom": '{"methods": {"zoom": {}}}'}), 400, "zoom"),
        ("tokenzoom method not allowed here", c(vllm_xargs={"tokenzoom": '{"preset": "vas"}'}), 400, "vas"),
        ("tokenzoom in mm_processor_kwargs", c(mm_processor_kwargs={"tokenzoom": "{}"}), 400, "vllm_xargs.tokenzoom"),
        ("tokenzoom per request, valid", c(vllm_xargs={"tokenzoom": '{"methods": {"ttm": {"prune_ratio": 0.5}}}'}), 200, None),
        ("text only, no video", c(None), 200, None),
    ]


def _png() -> str:
    import cv2

    ok, data = cv2.imencode(".png", make_video(1, 64, 64, seed=1)[0])
    return base64.b64encode(data.tobytes()).decode()


def test_bad_and_edge_inputs_get_a_clear_answer_and_leave_nothing_behind(server, media, records):
    table = cases(media)
    assert len(table) >= 30
    wrong = []
    for kind, body, status, fragment in table:
        got, reply = post(server, body)
        message = (reply.get("error") or {}).get("message", "") if isinstance(reply, dict) else ""
        if got != status or (fragment and fragment.lower() not in message.lower()) or (
                status == 200 and not reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] == 0):
            wrong.append((kind, got, message[:200]))
    got, _ = post(server, None, raw=b'{"model": "tiny", "messages": [')  # a body that is not JSON
    if got != 400:
        wrong.append(("body not JSON", got, ""))
    assert not wrong, "\n".join(map(str, wrong))
    _assert_clean(server)


def test_the_same_video_after_a_rejected_request_is_served(server, media):
    """A request refused after its video was processed (too long) must not break the next good
    request with the same video (vLLM's processor cache holds it by hash)."""
    c = lambda **k: chat(f"data:video/mp4;base64,{b64(media / 'frames5.mp4')}", media_dir=media, **k)  # noqa: E731
    assert post(server, c(text=" red" * 4000))[0] == 400
    status, reply = post(server, c())
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    assert post(server, c(max_tokens=10 ** 6))[0] == 400
    assert post(server, c())[0] == 200


def test_streams_cut_off_by_the_client_leave_nothing_behind(server, media):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="EMPTY")
    for cut in (0, 1, 5):
        stream = client.chat.completions.create(model="tiny", max_tokens=64, temperature=0.0, stream=True,
                                                messages=video_message(f"file://{media}/good.mp4", "What happens?"))
        for i, _ in enumerate(stream):
            if i >= cut:
                break
        stream.close()
    _assert_clean(server)


def _assert_clean(server) -> None:
    """The server answers, holds no KV block and logged no traceback. Requests are finished by the
    time their replies are read; the metrics gauge follows within a step, hence a good request first."""
    assert post(server, chat(media_dir=None, url=None))[0] == 200
    with urllib.request.urlopen(server[0] + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(server[0] + "/metrics") as r:
        metrics = r.read().decode()
    usage = [float(v) for v in re.findall(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", metrics, re.M)]
    assert usage and all(u == 0.0 for u in usage)
    log = server[1].read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:log.index("Traceback") + 3000]


def test_a_short_soak_of_mixed_methods_cancellations_and_a_burst(server, media, records):
    """``benchmarks/soak.py`` in small: every distinct request alone, a burst of 32 at once, then
    40 through 6 workers with 20% cancelled mid-stream; every completed reply equals its request
    alone, no error, and afterwards no KV block, no tokenzoom session and no traceback left."""
    from benchmarks import soak

    run = soak.Soak(server[0], soak.videos_in(media, 2), max_tokens=8, seed=1)
    report = run.run(requests=40, concurrency=6, cancel=0.2, burst=32)
    left = soak.after(server[0], records, server[1])
    assert report["errors_by_kind"] == {} and report["mismatches"] == 0, report
    assert report["completed"] + report["cancelled"] == 40 + 32 and report["cancelled"] > 0
    assert report["peak_kv_usage"] > 0  # the watcher saw the load it checks went away
    assert left["final_kv_usage"] == 0.0 and left["sessions_alive"] == 0 and left["tracebacks_in_log"] == 0, left
    assert left["sessions_released"] > 0


def test_the_responses_api_reads_a_per_request_setting_too(server):
    """/v1/responses takes the same vllm_xargs.tokenzoom as chat and completions: a bad one is a
    400 naming it, a good one is served (a text input: the setting has nothing to act on)."""
    body = {"model": "tiny", "input": "Name a colour.", "max_output_tokens": 4, "temperature": 0.0}
    status, reply = post(server, {**body, "vllm_xargs": {"tokenzoom": '{"methods": {"ttm": {"prune_ratio": 1.5}}}'}},
                         path="/v1/responses")
    assert status == 400 and "prune_ratio = 1.5 is out of range" in reply["error"]["message"], reply
    status, reply = post(server, {**body, "vllm_xargs": {"tokenzoom": '{"preset": "vas"}'}}, path="/v1/responses")
    assert status == 400 and "vas" in reply["error"]["message"], reply
    status, reply = post(server, {**body, "vllm_xargs": {"tokenzoom": '{"preset": "ttm"}'}}, path="/v1/responses")
    assert status == 200 and reply["usage"]["output_tokens"] == 4, reply
