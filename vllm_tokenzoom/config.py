"""tokenzoom's configuration: parsed strictly from vLLM's ``additional_config``.

Schema (README "Configuration")::

    {"tokenzoom": {"preset": "dycoke"}}
    {"tokenzoom": {"methods": {"ttm": {"prune_ratio": 0.7, "variant": "paper"}}}}
    {"tokenzoom": {"preset": "ttm", "methods": {"ttm": {"prune_ratio": 0.5}}}}  # preset, then overrides
    {"tokenzoom": {}}                                                           # the default preset
    {"tokenzoom": {"preset": "ttm", "per_request": ["ttm", "fastv"]}}           # what a request may choose

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
from vllm_tokenzoom.methods import ONE_PER_CONFIG, PLANNED, REGISTRY, Policy, Requirements, Stage, of_stage

CONFIG_KEY = "tokenzoom"

# preset name -> methods, in the paper's settings (DESIGN.md §2)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ttm": {"ttm": {"prune_ratio": 0.7}},
    "dycoke": {"ttm": {"prune_ratio": 0.7}, "dp": {"layer": 3, "prune_ratio": 0.7}},
    "fastv": {"fastv": {"layer": 2, "prune_ratio": 0.5}},
    "vas": {"vas": {}},
    # the three stages: TTM before the LLM, VAS inside it during prefill, dp between decode steps
    "cascade": {"ttm": {"prune_ratio": 0.7}, "vas": {}, "dp": {"layer": 3, "prune_ratio": 0.7}},
    "zoomvlm": {"voa": {}, "ata": {}},
    # no method: as vanilla vLLM (a request that must not be compressed; or an engine whose
    # requests choose their own, per_request)
    "none": {},
}
# what `--plugin tokenzoom` and `{"tokenzoom": {}}` mean: DyCoke with the paper's settings
DEFAULT_PRESET = "dycoke"
_TOP_KEYS = ("preset", "methods", "per_request")


@dataclass(frozen=True)
class TokenZoomConfig:
    """The resolved configuration: one policy per enabled method (``None`` = off)."""

    methods: Mapping[str, Policy] = field(default_factory=dict)
    preset: str | None = None
    # what a request may choose for itself (``requests.py``): True any method, False none,
    # or a tuple of the method names it may use
    per_request: bool | tuple[str, ...] = True

    def __getattr__(self, name: str):
        """``config.ttm``, ``config.dp``, ...: the policy of a registered method, or None."""
        if name in REGISTRY:
            return self.methods.get(name)
        raise AttributeError(name)

    def stage(self, stage: Stage) -> dict[str, Policy]:
        """The enabled policies of one stage, by name, in registry order."""
        return {name: p for name, p in self.methods.items() if p.stage is stage}

    @property
    def pre_llm(self) -> Policy | None:
        """The one policy that prunes the video before the LLM (TTM, a baseline, or VOA's
        overview and keyframes), or None."""
        return next(iter({**self.stage(Stage.PRE_LLM), **self.stage(Stage.REQUEST)}.values()), None)

    @property
    def decode(self) -> dict[str, Policy]:
        """The policies acting between decode steps: in VOA's first pass only its probe (the
        other decode methods act in the second pass, methods-spec §2.2 "Schedule")."""
        probes = {name: p.probe() for name, p in self.stage(Stage.REQUEST).items()}
        return {name: p for name, p in probes.items() if p is not None} or self.stage(Stage.DECODE)

    @property
    def in_llm(self) -> dict[str, Policy]:
        """The policies that act inside the LLM (prefill and decode stages): they need a session."""
        return {**self.stage(Stage.PREFILL), **self.decode}

    @property
    def _served(self) -> dict[str, Any]:
        """The enabled policies, and the classes of the methods ``per_request`` lists: an engine
        is fitted (``engine.py``) for what its requests may ask for too."""
        listed = self.per_request if isinstance(self.per_request, tuple) else ()
        return {**{m: REGISTRY[m] for m in listed}, **self.methods}

    @property
    def requirements(self) -> Requirements:
        """The union of the engine requirements of the enabled policies (and of ``per_request``'s)."""
        out = Requirements()
        for policy in self._served.values():
            out = out | policy.requirements
        return out

    @property
    def needs_tokenizer(self) -> bool:
        """Whether a policy has a default that comes from the model's tokenizer (``for_model``)."""
        return any(p.needs_tokenizer() for p in self.methods.values())

    def needing(self, requirement: str) -> list[str]:
        """Names of the enabled (and ``per_request``-listed) methods whose requirements set ``requirement``."""
        return [name for name, p in self._served.items() if getattr(p.requirements, requirement)]

    def for_model(self, num_layers: int, tokenizer=None) -> "TokenZoomConfig":
        """Every policy checked against a model of ``num_layers`` decoder layers, its
        model-dependent defaults filled in (``Policy.for_model``; from ``tokenizer`` too, where given)."""
        methods = {}
        for name, policy in self.methods.items():
            try:
                methods[name] = policy.for_model(num_layers, tokenizer)
            except TokenZoomConfigError as e:
                raise TokenZoomConfigError(f"{CONFIG_KEY}.methods.{name}.{e}") from None
        return dataclasses.replace(self, methods=types.MappingProxyType(methods))

    def to_dict(self) -> dict[str, Any]:
        """The resolved form, which parses back to an equal config."""
        out: dict[str, Any] = ({"methods": {name: _jsonable(dataclasses.asdict(p)) for name, p in self.methods.items()}}
                               if self.methods else {"preset": "none"})
        if self.per_request is not True:
            out["per_request"] = self.per_request if isinstance(self.per_request, bool) else list(self.per_request)
        return out


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
    if not merged and preset != "none":
        raise TokenZoomConfigError(f"{where}.methods is empty; name at least one method ({_fmt(REGISTRY)}) "
                                   f"or a preset ({_fmt(_ready_presets())}), or drop the 'tokenzoom' key")
    ordered = [name for name in REGISTRY if name in merged]  # registry order: stable and readable
    methods = {name: _build_policy(name, merged[name], f"{where}.methods.{name}") for name in ordered}
    _check_around(methods, where)
    for stage in ONE_PER_CONFIG:
        same = [m for m in methods if methods[m].stage is stage]
        if len(same) > 1:
            raise TokenZoomConfigError(f"{where}.methods: {_fmt(same)} both act {stage.value}; "
                                       f"allowed: at most one of {_fmt(of_stage(stage))}")
    per_request = _per_request(raw.get("per_request", True), f"{where}.per_request")
    return TokenZoomConfig(methods=types.MappingProxyType(methods), preset=preset, per_request=per_request)


def _check_around(methods: Mapping[str, Policy], where: str) -> None:
    """A method around the request (VOA) brings its own pre-LLM stage and passes: it composes
    with decode-stage methods only."""
    around = [m for m in methods if methods[m].stage is Stage.REQUEST]
    clash = [m for m in methods if methods[m].stage in (Stage.PRE_LLM, Stage.PREFILL)]
    if around and clash:
        raise TokenZoomConfigError(f"{where}.methods: {_fmt(around)} builds the video's tokens itself and cannot "
                                   f"run with {_fmt(clash)}; allowed with it: the decode-stage methods "
                                   f"({_fmt(of_stage(Stage.DECODE))})")


def _per_request(value: Any, where: str) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TokenZoomConfigError(f"{where} = {value!r} has the wrong type; allowed: true (any method), false "
                                   f"(none), or a list of method names ({_fmt(REGISTRY)})")
    for name in value:
        _check_method_name(name, where)
    return tuple(value)


def _ready_presets() -> list[str]:
    return [p for p, ms in PRESETS.items() if all(m in REGISTRY for m in ms)]


def _preset_methods(preset: Any) -> dict[str, dict[str, Any]]:
    where = f"{CONFIG_KEY}.preset"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise TokenZoomConfigError(f"{where} = {preset!r} is not a preset; allowed: {_fmt(PRESETS)}")
    missing = [m for m in PRESETS[preset] if m not in REGISTRY]
    if missing:
        raise TokenZoomConfigError(
            f"{where} = {preset!r} needs method(s) {_fmt(missing)}, not implemented yet; "
            f"presets available now: {_fmt(_ready_presets())}"
        )
    return {name: dict(settings) for name, settings in PRESETS[preset].items()}


def _check_method_name(name: Any, where: str) -> None:
    if name in REGISTRY:
        return
    if name in PLANNED:
        raise TokenZoomConfigError(
            f"{where}: method {name!r} is planned but not implemented yet; implemented: {_fmt(REGISTRY)}"
        )
    planned = f" (planned: {_fmt(PLANNED)})" if PLANNED else ""
    raise TokenZoomConfigError(f"{where}: unknown method {name!r}; allowed: {_fmt(REGISTRY)}{planned}")


def _build_policy(name: str, settings: Mapping[str, Any], where: str):
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(settings, tuple(fields), where)
    hints = typing.get_type_hints(cls)
    for key, value in settings.items():
        _check_type(value, hints[key], f"{where}.{key}")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}  # frozen and hashable
    try:
        return cls(**settings)
    except TokenZoomConfigError as e:  # the policy knows the range, we know the path
        raise TokenZoomConfigError(f"{where}.{e}") from None


_SCALARS = {
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Scalars, ``X | None``, ``list[X]`` and ``tuple[X, ...]`` (JSON lists) of them."""
    if not _conforms(value, hint):
        raise TokenZoomConfigError(f"{where} = {value!r} has the wrong type; allowed: {_type_name(hint)}")


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if hint is Any:
        return True
    if hint not in _SCALARS:
        raise TypeError(f"tokenzoom's config parser cannot check settings of type {hint!r}")
    return _SCALARS[hint](value)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return getattr(hint, "__name__", str(hint))


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def _reject_unknown(mapping: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise TokenZoomConfigError(f"{where}: unknown key(s) {_fmt(unknown)}; allowed: {_fmt(allowed)}")


def _require_mapping(value: Any, where: str, what: str) -> None:
    if not isinstance(value, Mapping):
        raise TokenZoomConfigError(f"{where} = {value!r} has the wrong type; allowed: {what}")


def _fmt(names) -> str:
    return ", ".join(repr(n) for n in names)
