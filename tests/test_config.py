"""The config schema users write in ``additional_config``: what it accepts and how it refuses."""
import pytest

from vllm_tokenzoom.config import DEFAULT_PRESET, PRESETS, parse_config
from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods import DP, TTM


def test_absent_key_means_tokenzoom_off():
    assert parse_config(None) is None
    assert parse_config({}) is None
    assert parse_config({"some_other_plugin": {"x": 1}}) is None


def test_empty_config_is_the_default_preset_dycoke():
    assert DEFAULT_PRESET == "dycoke"
    cfg = parse_config({"tokenzoom": {}})
    assert cfg == parse_config({"tokenzoom": {"preset": "dycoke"}})
    # DyCoke's main-table setting: K=0.7, L=3, P=0.7
    assert (cfg.ttm, cfg.dp) == (TTM(prune_ratio=0.7), DP(layer=3, prune_ratio=0.7, threshold=0.9))


def test_preset_none_runs_no_method_and_round_trips():
    """What a request that must not be compressed sends (``{}`` would be the default preset)."""
    cfg = parse_config({"tokenzoom": {"preset": "none"}})
    assert dict(cfg.methods) == {} and cfg.pre_llm is None and cfg.decode == {}
    assert parse_config({"tokenzoom": cfg.to_dict()}).methods == cfg.methods
    assert dict(parse_config({"tokenzoom": {"preset": "none", "methods": {"ttm": {}}}}).methods) == {"ttm": TTM()}


def test_ttm_preset_and_dp_alone():
    assert parse_config({"tokenzoom": {"preset": "ttm"}}).dp is None
    cfg = parse_config({"tokenzoom": {"methods": {"dp": {"layer": 2, "variant": "official"}}}})
    assert (cfg.ttm, cfg.dp) == (None, DP(layer=2, variant="official"))
    cfg = parse_config({"tokenzoom": {"preset": "dycoke", "methods": {"dp": {"prune_ratio": 0.5}}}})
    assert cfg.dp == DP(layer=3, prune_ratio=0.5) and cfg.ttm == TTM(prune_ratio=0.7)


def test_methods_and_preset_overrides():
    cfg = parse_config({"tokenzoom": {"methods": {"ttm": {"prune_ratio": 0.5, "variant": "official"}}}})
    assert cfg.ttm == TTM(prune_ratio=0.5, variant="official")
    cfg = parse_config({"tokenzoom": {"preset": "ttm", "methods": {"ttm": {"prune_ratio": 0.3}}}})
    assert cfg.ttm == TTM(prune_ratio=0.3)
    assert parse_config({"tokenzoom": {"methods": {"ttm": {}}}}).ttm == TTM()
    assert parse_config({"tokenzoom": {"methods": {"ttm": {"prune_ratio": 0}}}}).ttm.prune_ratio == 0


def test_resolved_form_round_trips():
    cfg = parse_config({"tokenzoom": {"preset": "dycoke", "methods": {"ttm": {"prune_ratio": 0.5}, "fastv": {}}}})
    again = parse_config({"tokenzoom": cfg.to_dict()})
    assert again.methods == cfg.methods  # every policy, every setting
    assert again.methods["ttm"] == TTM(prune_ratio=0.5) and list(again.methods) == ["ttm", "fastv", "dp"]


def test_fastv_settings_and_preset():
    from vllm_tokenzoom.methods import FastV

    assert parse_config({"tokenzoom": {"preset": "fastv"}}).fastv == FastV(layer=2, prune_ratio=0.5)
    cfg = parse_config({"tokenzoom": {"methods": {"ttm": {}, "fastv": {"layer": 3, "prune_ratio": 0.75}, "dp": {}}}})
    assert cfg.fastv == FastV(layer=3, prune_ratio=0.75) and cfg.ttm == TTM() and cfg.dp == DP()


def test_vas_and_cascade_presets():
    from vllm_tokenzoom.methods import VAS

    assert parse_config({"tokenzoom": {"preset": "vas"}}).methods == {"vas": VAS()}
    cascade = parse_config({"tokenzoom": {"preset": "cascade"}})
    assert list(cascade.methods) == ["ttm", "vas", "dp"]
    assert (cascade.ttm, cascade.vas, cascade.dp) == (TTM(prune_ratio=0.7), VAS(), DP(layer=3, prune_ratio=0.7))
    assert cascade.for_model(24).vas == VAS(end_layer=19)  # the model-dependent default, filled in


def test_requirements_are_the_union_of_the_methods():
    ttm = parse_config({"tokenzoom": {"preset": "ttm"}}).requirements
    assert not (ttm.prefix_caching_off or ttm.one_step_prefill or ttm.attention_backend) and ttm.kv_cache_dtypes is None
    dycoke = parse_config({"tokenzoom": {"preset": "dycoke"}})
    assert dycoke.requirements.prefix_caching_off and not dycoke.requirements.one_step_prefill
    assert dycoke.needing("prefix_caching_off") == ["dp"]
    both = parse_config({"tokenzoom": {"methods": {"fastv": {}, "dp": {}}}})
    assert both.requirements.one_step_prefill and both.needing("one_step_prefill") == ["fastv"]
    assert both.requirements.kv_cache_dtypes == ("auto", "bfloat16", "float16", "float32")
    assert both.needing("no_speculative_decoding") == ["fastv", "dp"]


def test_list_and_optional_settings(monkeypatch):
    """The parser checks every setting type a policy may declare (VAS and ZoomVLM need lists
    and optional values): JSON lists become tuples, null is allowed only where declared."""
    from dataclasses import dataclass

    from vllm_tokenzoom.methods import REGISTRY, PrefillPolicy

    @dataclass(frozen=True)
    class Probe(PrefillPolicy):
        coefficients: tuple[float, ...] = (1.0, -1.0, 1.0)
        layers: list[int] | None = None
        end_layer: int | None = None

    monkeypatch.setitem(REGISTRY, "probe", Probe)
    cfg = parse_config({"tokenzoom": {"methods": {"probe": {"coefficients": [1, -2, 1.5], "layers": [2, 3],
                                                            "end_layer": None}}}})
    assert cfg.methods["probe"] == Probe(coefficients=(1, -2, 1.5), layers=(2, 3), end_layer=None)
    assert parse_config({"tokenzoom": cfg.to_dict()}).methods == cfg.methods
    for bad, allowed in [({"layers": [2, "x"]}, "a list of int or null"), ({"coefficients": None}, "a list of float"),
                         ({"end_layer": 2.5}, "int or null"), ({"layers": 3}, "a list of int or null")]:
        with pytest.raises(TokenZoomConfigError, match="wrong type; allowed: " + allowed):
            parse_config({"tokenzoom": {"methods": {"probe": bad}}})


@pytest.mark.parametrize(
    "raw, names",
    [
        ({"methods": {"ttm": {"prune_ratio": 1.5}}}, ["tokenzoom.methods.ttm.prune_ratio", "1.5", "0.0 <= prune_ratio < 1.0"]),
        ({"methods": {"ttm": {"prune_ratio": -0.1}}}, ["prune_ratio", "-0.1", "0.0 <= prune_ratio < 1.0"]),
        ({"methods": {"ttm": {"prune_ratio": "0.7"}}}, ["tokenzoom.methods.ttm.prune_ratio", "'0.7'", "float"]),
        ({"methods": {"ttm": {"prune_ratio": True}}}, ["prune_ratio", "True", "float"]),
        ({"methods": {"ttm": {"variant": "fast"}}}, ["tokenzoom.methods.ttm.variant", "'fast'", "'paper', 'official'"]),
        ({"methods": {"ttm": {"window": 8}}}, ["tokenzoom.methods.ttm", "'window'", "'prune_ratio', 'variant'"]),
        ({"methods": {"ttm": 0.7}}, ["tokenzoom.methods.ttm", "0.7", "object"]),
        ({"methods": ["ttm"]}, ["tokenzoom.methods", "['ttm']", "object"]),
        ({"methods": {"voa": {}, "ttm": {}}}, ["'voa' builds the video's tokens itself", "'ttm'",
                                               "allowed with it: the decode-stage methods ('dp', 'ata')"]),
        ({"methods": {"voa": {}, "fastv": {}}}, ["'voa'", "cannot run with 'fastv'"]),
        ({"methods": {"voa": {"keyframes": 0}}}, ["tokenzoom.methods.voa.keyframes", "0", "keyframes >= 1"]),
        ({"methods": {"voa": {"frame_ratio": 0.5}}}, ["tokenzoom.methods.voa.frame_ratio", "0.5", "frame_ratio >= 1.0"]),
        ({"methods": {"voa": {"chosen": [3, 1]}}}, ["tokenzoom.methods.voa.chosen", "[3, 1]", "ascending order"]),
        ({"methods": {"h2o": {}}}, ["unknown method 'h2o'", "allowed: 'ttm', 'fastv', 'vas', 'dp', 'ata', 'voa'"]),
        ({"methods": {"fastv": {}, "vas": {}}}, ["'fastv', 'vas' both act inside the LLM", "at most one"]),
        ({"methods": {"vas": {"ratio": 0}}}, ["tokenzoom.methods.vas.ratio", "0 < ratio < 1"]),
        ({"methods": {"vas": {"coefficients": [1, 2]}}}, ["tokenzoom.methods.vas.coefficients", "three numbers"]),
        ({"methods": {"vas": {"end_layer": "last"}}}, ["tokenzoom.methods.vas.end_layer", "'last'", "int or null"]),
        ({"methods": {}}, ["tokenzoom.methods is empty", "'ttm'", "'dycoke'"]),
        ({"methods": {"ttm": {}, "random_drop": {}}}, ["'ttm', 'random_drop' both act before the LLM", "at most one"]),
        ({"methods": {"fastv": {"layer": 0}}}, ["tokenzoom.methods.fastv.layer", "0", "layer >= 1"]),
        ({"methods": {"fastv": {"prune_ratio": 1}}}, ["tokenzoom.methods.fastv.prune_ratio", "0.0 <= prune_ratio < 1.0"]),
        ({"methods": {"dp": {"layer": 0}}}, ["tokenzoom.methods.dp.layer", "0", "layer >= 1"]),
        ({"methods": {"dp": {"layer": 2.5}}}, ["tokenzoom.methods.dp.layer", "2.5", "int"]),
        ({"methods": {"dp": {"threshold": 2}}}, ["tokenzoom.methods.dp.threshold", "2", "-1.0 <= threshold <= 1.0"]),
        ({"methods": {"dp": {"top_k": 3}}}, ["tokenzoom.methods.dp", "'top_k'", "'layer', 'prune_ratio', 'threshold', 'variant'"]),
        ({"preset": "fastest"}, ["tokenzoom.preset", "'fastest'", "'ttm', 'dycoke', 'fastv', 'vas', 'cascade', 'zoomvlm'"]),
        ({"preset": 3}, ["tokenzoom.preset", "3"]),
        ({"ttm": {"prune_ratio": 0.7}}, ["tokenzoom", "unknown key(s) 'ttm'", "'preset', 'methods'"]),
        ("ttm", ["tokenzoom", "'ttm'", "object"]),
    ],
)
def test_bad_config_names_key_value_and_allowed(raw, names):
    with pytest.raises(TokenZoomConfigError) as err:
        parse_config({"tokenzoom": raw})
    for name in names:
        assert name in str(err.value), f"{name!r} missing from: {err.value}"


def test_every_preset_names_known_methods():
    from vllm_tokenzoom.methods import PLANNED, REGISTRY

    for methods in PRESETS.values():
        assert set(methods) <= set(REGISTRY) | set(PLANNED)
