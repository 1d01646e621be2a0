"""VAS inside vLLM against the dense HF reference (methods-spec.md §1.5): the same trace (drop
layers, axes, frames and cells left, kept tokens), the same death layers and the same greedy
tokens in fp32 -- alone, after TTM, in the ``cascade`` preset (TTM, VAS, dp), in batches
mixing VAS, FastV, dp and plain requests, after preemption; and the later layers really
compute fewer rows. The model is ``tiny-deep`` (12 layers: VAS's defaults score at layers 2-7)."""
import pytest

from tests.parity import assert_matches, cached_reference
from vllm_tokenzoom.config import PRESETS, parse_config
from vllm_tokenzoom.methods import DP, TTM, VAS, FastV
from vllm_tokenzoom.testing.offline import run_offline
from vllm_tokenzoom.testing.tiny_model import PRESETS as MODELS

LAYERS = MODELS["tiny-deep"]["text"]["num_hidden_layers"]
VIDEOS = [dict(frames=16, seed=60, max_tokens=10), dict(frames=7, seed=61, max_tokens=10),
          dict(frames=3, seed=62, max_tokens=10)]
TEXT = [dict(frames=0, question="Name three colours.", max_tokens=10)]
BUSY = {"ratio": 0.3, "interval": 2, "start_layer": 1}  # more drops on 12 layers: every 2 layers from 3 on
CASCADE = {name: parse_config({"tokenzoom": {"methods": {name: s}}}).methods[name]
           for name, s in PRESETS["cascade"].items()}
SETTINGS = {  # name -> (tokenzoom config, reference policies)
    "vas": ({"preset": "vas"}, dict(vas=VAS())),
    "vas busy": ({"methods": {"vas": BUSY}}, dict(vas=VAS(**BUSY))),
    "ttm+vas": ({"methods": {"ttm": {}, "vas": BUSY}}, dict(ttm=TTM(), vas=VAS(**BUSY))),
    "cascade": ({"preset": "cascade"}, CASCADE),
}


@pytest.fixture(scope="module")
def reference(dense_deep):
    return cached_reference(dense_deep)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_same_trace_and_greedy_output_as_reference(tiny_deep_model, reference, setting):
    config, policies = SETTINGS[setting]
    outputs = run_offline(tiny_deep_model, VIDEOS, {"tokenzoom": config}, trace=True)["outputs"]
    drops = 0
    for request, got in zip(VIDEOS, outputs, strict=True):
        ref = reference(request, **policies)
        drops += len(ref.traces["vas"])
        assert_matches(got, ref)
    assert drops >= len(VIDEOS)  # every request dropped at least once


def test_the_settings_exercise_both_axes_and_several_drops(reference):
    """The parity tests could not see a wrong axis or a missed later drop if none happened."""
    traces = [reference(r, **policies).traces["vas"] for r in VIDEOS for _, policies in SETTINGS.values()]
    assert {e["axis"] for t in traces for e in t} == {"frames", "cells"}
    assert max(len(t) for t in traces) >= 3
    assert [reference(r).tokens for r in VIDEOS] != [reference(r, vas=VAS()).tokens for r in VIDEOS]


def test_later_layers_compute_only_the_alive_rows(tiny_deep_model, reference):
    """Rows per decoder layer, counted inside the layers: after each drop layer, the prompt
    minus every visual token dead by then; one row per decode step."""
    request = dict(VIDEOS[0], max_tokens=3)
    config = {"tokenzoom": SETTINGS["vas busy"][0]}
    result = run_offline(tiny_deep_model, [request], config, preload=["tests.rows_hook"])
    forwards = result["reports"]["tests.rows_hook"]
    ref = reference(request, vas=VAS(**BUSY))
    n, alive, expected = ref.num_prompt_tokens, request["frames"] * 196, []
    drops = {e["layer"]: len(e["kept"]) for e in ref.traces["vas"]}
    for layer in range(LAYERS):
        expected.append(n - (request["frames"] * 196 - alive))
        alive = drops.get(layer, alive)
    assert len(drops) >= 2 and forwards[-3] == expected  # the prefill forward
    assert forwards[-2:] == [[1] * LAYERS] * 2  # decode forwards


@pytest.mark.parametrize("ttm", [False, True], ids=["no pre-LLM stage", "after TTM"])
def test_mixed_batch_vas_fastv_dp_and_plain_requests(tiny_deep_model, reference, ttm):
    """One engine, one batch: VAS, FastV, dp, VAS + dp and plain video requests (each its own
    per-request setting) and a text-only request, each equal to its reference (the plain ones
    to the reference without methods). After TTM the same mix is cascade-like, ttm + fastv,
    dycoke (ttm + dp), cascade and ttm."""
    batch = [VIDEOS[0], TEXT[0], VIDEOS[1], VIDEOS[2], dict(VIDEOS[0], seed=63), dict(VIDEOS[1], seed=64)]
    pre_llm = {"ttm": {}} if ttm else {"ttm": {"prune_ratio": 0.0}}  # K=0: vanilla's tokens (test_disabled)
    mix = [{"vas": BUSY}, {"fastv": {"layer": 3}}, {"dp": {}}, {"vas": BUSY, "dp": {}}, {}]
    for i, methods in zip((0, 2, 3, 4, 5), mix):
        batch[i] = dict(batch[i], tokenzoom={"methods": {**pre_llm, **methods}})
    config = {"tokenzoom": {"methods": {**({"ttm": {}} if ttm else {}), "vas": BUSY, "dp": {}}}}
    outputs = run_offline(tiny_deep_model, batch, config, batch=True, trace=True)["outputs"]
    batch = [{k: v for k, v in r.items() if k != "tokenzoom"} for r in batch]
    policies = [dict(vas=VAS(**BUSY)), dict(fastv=FastV(layer=3)), dict(dp=DP()), dict(vas=VAS(**BUSY), dp=DP()), {}]
    pre = dict(ttm=TTM()) if ttm else {}
    for i, mine in zip((0, 2, 3, 4, 5), policies):
        ref = reference(batch[i], **pre, **mine)
        if mine:
            assert_matches(outputs[i], ref)
        assert outputs[i]["tokens"] == ref.tokens
    vanilla = run_offline(tiny_deep_model, TEXT, plugins=False)["outputs"]
    assert outputs[1]["tokens"] == vanilla[0]["tokens"]


def test_preemption_replays_the_stored_decisions(tiny_deep_model):
    """Two 16-frame cascade requests, KV for both to decode 128 tokens, not more: one is
    preempted mid-decode and recomputed in one step; its rows drop again at the stored
    layers (VAS decides once per request) and its output equals the unpressured run's."""
    requests = [dict(VIDEOS[0], max_tokens=140), dict(frames=16, seed=64, max_tokens=140)]
    config = {"tokenzoom": {"methods": {"ttm": {}, "vas": BUSY, "dp": {}}}}
    kwargs = {"num_gpu_blocks_override": 27, "max_model_len": 3072}
    pressured = run_offline(tiny_deep_model, requests, config, llm_kwargs=kwargs, batch=True, trace=True)["outputs"]
    assert sum(o["num_preemptions"] for o in pressured) >= 1
    alone = run_offline(tiny_deep_model, requests, config, trace=True)["outputs"]
    assert [o["traces"]["vas"] for o in pressured] == [o["traces"]["vas"] for o in alone]
    assert [o["tokens"] for o in pressured] == [o["tokens"] for o in alone]
