"""FastV inside vLLM against the dense HF reference (methods-spec.md §3.5): the same kept
tokens and the same greedy tokens in fp32, alone, after TTM, with DyCoke's dp, in batches
mixed with plain and dp requests, after preemption; and the later layers really compute
fewer rows."""
import pytest

from tests.parity import assert_matches, cached_reference
from vllm_tokenzoom.methods import DP, TTM, FastV
from vllm_tokenzoom.testing.offline import run_offline
from vllm_tokenzoom.testing.tiny_model import PRESETS

TINY_LAYERS = PRESETS["tiny"]["text"]["num_hidden_layers"]
VIDEOS = [dict(frames=16, seed=60, max_tokens=10), dict(frames=7, seed=61, max_tokens=10),
          dict(frames=3, seed=62, max_tokens=10)]
TEXT = [dict(frames=0, question="Name three colours.", max_tokens=10)]
FASTV = FastV(layer=2, prune_ratio=0.5)
SETTINGS = {  # name -> (config, reference policies)
    "fastv": ({"methods": {"fastv": {"layer": 2, "prune_ratio": 0.5}}}, dict(fastv=FASTV)),
    "ttm+fastv": ({"methods": {"ttm": {}, "fastv": {"layer": 2, "prune_ratio": 0.5}}}, dict(ttm=TTM(), fastv=FASTV)),
    "ttm+fastv+dp": ({"methods": {"ttm": {}, "fastv": {"layer": 2, "prune_ratio": 0.5}, "dp": {}}},
                     dict(ttm=TTM(), fastv=FASTV, dp=DP())),
    "fastv K=1 R=0.75": ({"methods": {"fastv": {"layer": 1, "prune_ratio": 0.75}}},
                         dict(fastv=FastV(layer=1, prune_ratio=0.75))),
}


@pytest.fixture(scope="module")
def reference(dense):
    return cached_reference(dense)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_same_kept_tokens_and_greedy_output_as_reference(tiny_model, reference, setting):
    config, policies = SETTINGS[setting]
    requests = VIDEOS if setting != "fastv K=1 R=0.75" else VIDEOS[:1]
    outputs = run_offline(tiny_model, requests, {"tokenzoom": config}, trace=True)["outputs"]
    for request, got in zip(requests, outputs, strict=True):
        ref = reference(request, **policies)
        (layer, kept), = ref.traces["fastv"]
        num_visual = request["frames"] * 196 if ref.kept is None else len(ref.kept)  # after TTM
        assert layer == policies["fastv"].layer - 1 and len(kept) == policies["fastv"].num_kept(num_visual)
        assert_matches(got, ref)


def test_fastv_changes_the_output(reference):
    """The parity tests could not see a wrong selection if dropping changed nothing."""
    assert [reference(r).tokens for r in VIDEOS] != [reference(r, fastv=FASTV).tokens for r in VIDEOS]


def test_later_layers_compute_only_the_kept_rows(tiny_model, reference, dense, prompt):
    """Rows per decoder layer, counted inside the layers: the whole prompt up to layer K-1,
    then only the kept visual tokens and every other token; one row per decode step."""
    request = dict(VIDEOS[0], max_tokens=3)
    result = run_offline(tiny_model, [request], {"tokenzoom": SETTINGS["fastv"][0]}, preload=["tests.rows_hook"])
    forwards = result["reports"]["tests.rows_hook"]
    ref = reference(request, fastv=FASTV)
    n, visual = ref.num_prompt_tokens, 16 * 196
    dropped = visual - round(visual * 0.5)
    assert forwards[-3] == [n, n] + [n - dropped] * (TINY_LAYERS - 2)  # the prefill forward
    assert forwards[-2:] == [[1] * TINY_LAYERS] * 2  # decode forwards


def test_mixed_batch_fastv_dp_and_plain_requests(tiny_model, reference, vanilla_text):
    """One engine, one batch: FastV-only, dp-only and FastV+dp video requests (each its own
    per-request setting) and a plain text request, each equal to its reference."""
    batch = [VIDEOS[0], TEXT[0], VIDEOS[1], VIDEOS[2], dict(VIDEOS[0], seed=63)]
    config = {"tokenzoom": {"methods": {"fastv": {"layer": 2, "prune_ratio": 0.5}, "dp": {}}}}
    fastv, dp = {"fastv": {"layer": 2, "prune_ratio": 0.5}}, {"dp": {}}
    for i, methods in zip((0, 2, 3), [fastv, dp, {**fastv, **dp}]):
        batch[i] = dict(batch[i], tokenzoom={"methods": methods})  # the 4th video: the engine's fastv + dp
    outputs = run_offline(tiny_model, batch, config, batch=True, trace=True)["outputs"]
    batch = [{k: v for k, v in r.items() if k != "tokenzoom"} for r in batch]
    mix = [dict(fastv=FASTV), dict(dp=DP()), dict(fastv=FASTV, dp=DP()), dict(fastv=FASTV, dp=DP())]
    for i, policies in zip((0, 2, 3, 4), mix):
        assert_matches(outputs[i], reference(batch[i], **policies))
    assert outputs[1]["tokens"] == vanilla_text[0]["tokens"]


@pytest.fixture(scope="module")
def vanilla_text(tiny_model):
    return run_offline(tiny_model, TEXT, plugins=False)["outputs"]


def test_preemption_replays_the_stored_decision(tiny_model):
    """Two 16-frame ttm+fastv requests (12-block prompts), KV for both to decode 128 tokens,
    not more: one is preempted mid-decode and recomputed in one step; its rows drop again at
    layer K from the stored decision (FastV decides once per request) and its output equals
    the unpressured run's."""
    requests = [dict(VIDEOS[0], max_tokens=140), dict(frames=16, seed=64, max_tokens=140)]
    config = {"tokenzoom": SETTINGS["ttm+fastv"][0]}
    kwargs = {"num_gpu_blocks_override": 27, "max_model_len": 3072}
    pressured = run_offline(tiny_model, requests, config, llm_kwargs=kwargs, batch=True, trace=True)["outputs"]
    assert sum(o["num_preemptions"] for o in pressured) >= 1
    assert all(len(o["traces"]["fastv"]) == 1 for o in pressured)
    alone = run_offline(tiny_model, requests, config)["outputs"]
    assert [o["tokens"] for o in pressured] == [o["tokens"] for o in alone]


def test_sessions_are_released_when_requests_end_on_an_idle_engine(tiny_model):
    """With the engine core in its own process (as under `vllm serve`), the sessions of finished
    requests (and their key copies) are gone while the engine sits idle, without a new request."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    config = {"tokenzoom": SETTINGS["ttm+fastv+dp"][0]}
    result = run_offline(tiny_model, VIDEOS[1:], config, env=env, idle_sessions=True, batch=True)
    assert [len(o["tokens"]) for o in result["outputs"]] == [10, 10]
    assert result["idle_sessions"] == 0
