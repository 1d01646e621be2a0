"""tokenzoom's configuration: parsed strictly from vLLM's ``additional_config``.

Schema (README "Configuration")::

    {"tokenzoom": {"preset": "dycoke"}}
    {"tokenzoom": {"methods": {"ttm": {"prune_ratio": 0.7, "variant": "paper"}}}}
    {"tokenzoom": {"preset": "ttm", "methods": {"ttm": {"prune_ratio": 0.5}}}}  # preset, then overrides
    {"tokenzoom": {}}                                                           # the default preset

Each method's settings are the fields of its policy dataclass (``vllm_tokenzoom/methods``).
Unknown keys, wrong types, out-of-range values, planned-but-unimplemented methods and
presets are rejected with a :class:`TokenZoomConfigError` naming the key, the bad value
and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.methods import IMPLEMENTED, PLANNED, PRE_LLM

CONFIG_KEY = "tokenzoom"

# preset name -> methods, in the paper's settings (DESIGN.md §2)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ttm": {"ttm": {"prune_ratio": 0.7}},
    "dycoke": {"ttm": {"prune_ratio": 0.7}, "dp": {"layer": 3, "prune_ratio": 0.7}},
    "zoomvlm": {"voa": {}, "ata": {}},
}
# what `--plugin tokenzoom` and `{"tokenzoom": {}}` mean: DyCoke with the paper's settings
DEFAULT_PRESET = "dycoke"
_TOP_KEYS = ("preset", "methods")


@dataclass(frozen=True)
class TokenZoomConfig:
    """The resolved configuration: one policy per enabled method (``None`` = off)."""

    methods: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None

    @property
    def ttm(self):
        return self.methods.get("ttm")

    @property
    def pre_llm(self):
        """The one policy that prunes the video before the LLM (TTM or a baseline), or None."""
        return next((self.methods[m] for m in PRE_LLM if m in self.methods), None)

    @property
    def dp(self):
        return self.methods.get("dp")

    def to_dict(self) -> dict[str, Any]:
        """The resolved form, which parses back to an equal config."""
        return {"methods": {name: dataclasses.asdict(policy) for name, policy in self.methods.items()}}


def parse_config(additional_config: Mapping[str, Any] | None) -> TokenZoomConfig | None:
    """``additional_config`` -> the tokenzoom config, or ``None`` when tokenzoom is not enabled."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    raw = additional_config[CONFIG_KEY]
    where = CONFIG_KEY
    if raw is None:
        raw = {}
    _require_mapping(raw, where, f"an object with keys {_fmt(_TOP_KEYS)}")
    _reject_unknown(raw, _TOP_KEYS, where)

    preset = raw.get("preset")
    methods_raw = raw.get("methods")
    if preset is None and methods_raw is None:
        preset = DEFAULT_PRESET
    merged: dict[str, dict[str, Any]] = {}
    if preset is not None:
        merged = _preset_methods(preset)
    if methods_raw is not None:
        _require_mapping(methods_raw, f"{where}.methods", "an object of method name -> settings")
        for name, settings in methods_raw.items():
            _check_method_name(name, f"{where}.methods")
            if settings is None:
                settings = {}
            _require_mapping(settings, f"{where}.methods.{name}", "an object of settings")
            merged[name] = {**merged.get(name, {}), **settings}
    methods = {name: _build_policy(name, settings, f"{where}.methods.{name}") for name, settings in merged.items()}
    pre_llm = [m for m in PRE_LLM if m in methods]
    if len(pre_llm) > 1:
        raise TokenZoomConfigError(
            f"{where}.methods: {_fmt(pre_llm)} both prune the video before the LLM; allowed: at most one of {_fmt(PRE_LLM)}"
        )
    return TokenZoomConfig(methods=types.MappingProxyType(methods), preset=preset)


def _preset_methods(preset: Any) -> dict[str, dict[str, Any]]:
    where = f"{CONFIG_KEY}.preset"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise TokenZoomConfigError(f"{where} = {preset!r} is not a preset; allowed: {_fmt(PRESETS)}")
    missing = [m for m in PRESETS[preset] if m not in IMPLEMENTED]
    if missing:
        ready = [p for p, ms in PRESETS.items() if all(m in IMPLEMENTED for m in ms)]
        raise TokenZoomConfigError(
            f"{where} = {preset!r} needs method(s) {_fmt(missing)}, not implemented yet; "
            f"presets available now: {_fmt(ready)}"
        )
    return {name: dict(settings) for name, settings in PRESETS[preset].items()}


def _check_method_name(name: Any, where: str) -> None:
    if name in IMPLEMENTED:
        return
    if name in PLANNED:
        raise TokenZoomConfigError(
            f"{where}: method {name!r} is planned but not implemented yet; implemented: {_fmt(IMPLEMENTED)}"
        )
    raise TokenZoomConfigError(
        f"{where}: unknown method {name!r}; allowed: {_fmt(IMPLEMENTED)} (planned: {_fmt(PLANNED)})"
    )


def _build_policy(name: str, settings: Mapping[str, Any], where: str):
    cls = IMPLEMENTED[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(settings, tuple(fields), where)
    hints = typing.get_type_hints(cls)
    for key, value in settings.items():
        _check_type(value, hints[key], f"{where}.{key}")
    try:
        return cls(**settings)
    except TokenZoomConfigError as e:  # the policy knows the range, we know the path
        raise TokenZoomConfigError(f"{where}.{e}") from None


def _check_type(value: Any, hint: Any, where: str) -> None:
    ok = {
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[hint](value)
    if not ok:
        raise TokenZoomConfigError(f"{where} = {value!r} has the wrong type; allowed: {hint.__name__}")


def _reject_unknown(mapping: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise TokenZoomConfigError(f"{where}: unknown key(s) {_fmt(unknown)}; allowed: {_fmt(allowed)}")


def _require_mapping(value: Any, where: str, what: str) -> None:
    if not isinstance(value, Mapping):
        raise TokenZoomConfigError(f"{where} = {value!r} has the wrong type; allowed: {what}")


def _fmt(names) -> str:
    return ", ".join(repr(n) for n in names)
