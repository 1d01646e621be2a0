"""Per-request settings, checked where a request enters: every refusal names the key, the value
and what is allowed; an accepted one becomes one canonical string that parses back to itself."""
import json

import pytest

from vllm_tokenzoom.config import parse_config
from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.requests import EngineFacts, canonical, parsed, request_config

LAYERS = 4
# an engine as tokenzoom fits it for in-LLM methods, and one left as vLLM's defaults (prefix caching on)
FITTED = EngineFacts(prefix_caching=False, chunked_prefill=False, async_scheduling=False, kv_cache_dtype="auto",
                     speculative_decoding=False, pipeline_parallel_size=1, attention_backend=True)
PLAIN = EngineFacts(prefix_caching=True, chunked_prefill=True, async_scheduling=True, kv_cache_dtype="auto",
                    speculative_decoding=False, pipeline_parallel_size=1, attention_backend=True)


def server(**config):
    return parse_config({"tokenzoom": config})


def test_a_request_replaces_the_engine_config_and_round_trips():
    got = request_config('{"methods": {"ttm": {"prune_ratio": 0.5}}}', server(preset="dycoke"), FITTED, LAYERS)
    assert list(got.methods) == ["ttm"] and got.ttm.prune_ratio == 0.5  # not merged with the server's dp
    text = canonical(got)
    assert json.loads(text) == {"methods": {"ttm": json.loads(text)["methods"]["ttm"]}}
    assert parsed(text, LAYERS).ttm == got.ttm
    # offline clients may send the dict itself; a preset by name works as in the engine config
    assert request_config({"preset": "fastv"}, server(), FITTED, LAYERS).fastv.prune_ratio == 0.5


@pytest.mark.parametrize("value, names", [
    ('{"methods": {"ttm": {"prune_ratio": 1.5}}}', ["prune_ratio", "1.5"]),
    ('{"methods": {"ttm": {"prune_ratio": "half"}}}', ["prune_ratio", "'half'", "float"]),
    ('{"methods": {"nope": {}}}', ["'nope'", "allowed", "'ttm'"]),
    ('{"preset": "fast"}', ["preset", "'fast'", "'cascade'"]),
    ('{"mehtods": {}}', ["'mehtods'", "'methods'"]),
    ('{"methods": {"ttm": {"prune_ratio": 0.5}', ["not valid JSON", "character"]),
    ('[1, 2]', ["wrong type", "an object"]),
    ('{"methods": {"fastv": {"layer": 9}}}', ["layer", "9", "4"]),  # against the model's 4 layers
    ('{"per_request": true}', ["per_request", "operator"]),
])
def test_bad_settings_name_what_was_wrong(value, names):
    with pytest.raises(TokenZoomConfigError) as e:
        request_config(value, server(), FITTED, LAYERS)
    message = str(e.value)
    assert message.startswith("tokenzoom")
    for name in names:
        assert name in message, message


def test_the_operator_can_forbid_or_bound_per_request_settings():
    with pytest.raises(TokenZoomConfigError, match="per_request: false"):
        request_config('{"preset": "ttm"}', server(preset="ttm", per_request=False), PLAIN, LAYERS)
    bounded = server(preset="ttm", per_request=["ttm", "fastv"])
    assert request_config('{"methods": {"fastv": {}}}', bounded, FITTED, LAYERS).fastv is not None
    with pytest.raises(TokenZoomConfigError, match="'dp' not allowed on this server; allowed: 'ttm', 'fastv'"):
        request_config('{"preset": "dycoke"}', bounded, FITTED, LAYERS)
    with pytest.raises(TokenZoomConfigError, match="per_request"):
        server(per_request=["ttm", "zoom"])
    with pytest.raises(TokenZoomConfigError, match="wrong type"):
        server(per_request="yes")


def test_an_engine_is_fitted_for_the_methods_its_requests_may_use():
    # ttm alone keeps prefix caching; listing fastv for requests makes the engine turn it off
    assert not server(preset="ttm").requirements.prefix_caching_off
    bounded = server(preset="ttm", per_request=["ttm", "fastv"])
    assert bounded.requirements.prefix_caching_off and bounded.requirements.one_step_prefill
    assert bounded.needing("one_step_prefill") == ["fastv"]
    assert bounded.to_dict()["per_request"] == ["ttm", "fastv"]


def test_a_method_this_engine_cannot_run_is_refused_naming_the_server_setting():
    with pytest.raises(TokenZoomConfigError) as e:
        request_config('{"preset": "fastv"}', server(preset="ttm"), PLAIN, LAYERS)
    message = str(e.value)
    assert "'fastv' need prefix caching off; this server runs with it on" in message
    assert "chunked prefill" in message
    with pytest.raises(TokenZoomConfigError, match="--async-scheduling"):
        request_config('{"methods": {"ata": {"first_score_layer": 1}}}', server(preset="ttm"), PLAIN, LAYERS)
    # what the server can run passes
    assert request_config('{"methods": {"ttm": {"prune_ratio": 0.3}}}', server(preset="ttm"), PLAIN, LAYERS).ttm


def test_a_setting_sent_to_a_server_without_tokenzoom_is_refused():
    with pytest.raises(TokenZoomConfigError, match="not enabled on this server.*--plugin tokenzoom"):
        request_config('{"preset": "ttm"}', None, None, LAYERS)
