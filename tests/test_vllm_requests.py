"""Per-request settings offline (``SamplingParams(extra_args={"tokenzoom": ...})``): one batch
mixing requests with different settings and none, each equal to its dense reference under its
own setting (so to the same request sent alone with that setting as the engine's config, which
the methods' own parity tests hold to the same reference); a bad setting is refused by name."""
import pytest

from tests.parity import assert_matches, cached_reference
from vllm_tokenzoom.methods import DP, TTM, FastV
from vllm_tokenzoom.testing.offline import run_offline

ENGINE = {"tokenzoom": {"preset": "ttm", "per_request": ["ttm", "fastv", "dp"]}}
VIDEO = dict(frames=16, seed=70, max_tokens=10)
TEXT = dict(frames=0, question="Name three colours.", max_tokens=10)
FASTV = {"methods": {"fastv": {"layer": 2, "prune_ratio": 0.5}}}
BATCH = [  # (request, the policies its reference runs)
    (dict(VIDEO, tokenzoom={"methods": {"ttm": {"prune_ratio": 0.5}}}), dict(ttm=TTM(prune_ratio=0.5))),
    (dict(VIDEO, seed=71), dict(ttm=TTM(prune_ratio=0.7))),  # no setting: the engine's ttm preset
    (dict(VIDEO, frames=7, seed=72, tokenzoom=FASTV), dict(fastv=FastV(layer=2, prune_ratio=0.5))),
    (dict(VIDEO, seed=73, tokenzoom={"methods": {"ttm": {}, "dp": {}}}), dict(ttm=TTM(), dp=DP())),
    (dict(TEXT, tokenzoom=FASTV), {}),  # a text request: its setting has nothing to act on
    # as the server gets it: a JSON string (the seed test_vllm_ttm holds to the reference for this variant)
    (dict(VIDEO, seed=6, tokenzoom='{"methods": {"ttm": {"prune_ratio": 0.5, "variant": "official"}}}'),
     dict(ttm=TTM(prune_ratio=0.5, variant="official"))),
]


@pytest.fixture(scope="module")
def reference(dense):
    return cached_reference(dense)


def test_a_batch_mixing_settings_answers_each_as_its_own_setting(tiny_model, reference, vanilla_text):
    requests = [r for r, _ in BATCH]
    outputs = run_offline(tiny_model, requests, ENGINE, batch=True, trace=True)["outputs"]
    for (request, policies), got in zip(BATCH, outputs, strict=True):
        if request["frames"] == 0:
            assert got["tokens"] == vanilla_text[0]["tokens"]
            continue
        ref = reference({k: v for k, v in request.items() if k != "tokenzoom"}, **policies)
        assert got["num_prompt_tokens"] == ref.num_prompt_tokens, request
        assert_matches(got, ref)
    counts = [o["num_prompt_tokens"] for o in outputs]
    assert counts[0] != counts[1] and counts[2] < counts[1]  # K=0.5, K=0.7, FastV's 7 frames: three lengths


def test_a_bad_setting_fails_naming_it_and_a_server_without_tokenzoom_refuses_any(tiny_model):
    bad = dict(VIDEO, tokenzoom={"methods": {"ttm": {"prune_ratio": 1.5}}})
    with pytest.raises(RuntimeError, match=r"tokenzoom\.methods\.ttm\.prune_ratio = 1\.5 is out of range"):
        run_offline(tiny_model, [bad], ENGINE)
    with pytest.raises(RuntimeError, match="'dp' not allowed on this server; allowed: 'ttm'"):
        run_offline(tiny_model, [dict(VIDEO, tokenzoom={"preset": "dycoke"})],
                    {"tokenzoom": {"preset": "ttm", "per_request": ["ttm"]}})
    with pytest.raises(RuntimeError, match="not enabled on this server"):
        run_offline(tiny_model, [dict(VIDEO, tokenzoom={"preset": "ttm"})], {})


@pytest.fixture(scope="module")
def vanilla_text(tiny_model):
    return run_offline(tiny_model, [TEXT], plugins=False)["outputs"]
