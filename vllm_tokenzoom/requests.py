"""Per-request tokenzoom settings (README "Per-request settings").

A client chooses the compression of one request with vLLM's own per-request channel:
``extra_body={"vllm_xargs": {"tokenzoom": "<JSON>"}}`` in the OpenAI API (vLLM allows only
strings and numbers there, hence JSON in a string) or ``SamplingParams(extra_args={"tokenzoom":
{...}})`` offline (a dict or the same JSON string). The JSON has the schema of the engine's
``tokenzoom`` config (``config.py``) and *replaces* it for that request; a request without
it gets the engine's config.

The request's config is checked where it enters (before the prompt is rendered, so a bad
one is an HTTP 400 that touches nothing): parsed as strictly as the engine's, checked
against the model (``for_model``), against what the operator allows (the engine config's
``per_request``) and against what this engine provides (``EngineFacts``: a method needing
prefix caching off cannot run on a server that has it on). It then travels in its
canonical form (``canonical``) to every stage:
- the multimodal processor, in the request's ``mm_processor_kwargs`` (``MM_KEY``), which
  vLLM hashes into its processor- and encoder-cache keys: the placeholder count per video;
- the model, as a per-video field of the multimodal inputs (``PRE_LLM_FIELD``): the pre-LLM policy;
- the worker, in ``SamplingParams.extra_args`` (``XARG``): the in-LLM policies of the request's session.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

from vllm_tokenzoom.config import CONFIG_KEY, TokenZoomConfig, parse_config
from vllm_tokenzoom.errors import TokenZoomConfigError

XARG = CONFIG_KEY  # vllm_xargs / SamplingParams.extra_args key
MM_KEY = CONFIG_KEY  # mm_processor_kwargs key (stripped before the HF processor sees the kwargs)
PRE_LLM_FIELD = "tokenzoom_pre_llm"  # per-video multimodal input: the request's pre-LLM policy
ENGINE_ATTR = "tokenzoom_engine"  # hf_config attribute: this engine's EngineFacts, as a dict


@dataclass(frozen=True)
class EngineFacts:
    """What this engine provides, for checking a request's ``Requirements`` against it."""

    prefix_caching: bool
    chunked_prefill: bool
    async_scheduling: bool
    kv_cache_dtype: str
    speculative_decoding: bool
    pipeline_parallel_size: int
    attention_backend: bool  # tokenzoom's attention backend is installed
    mm_processor_cache: bool = False

    @classmethod
    def of(cls, vllm_config) -> "EngineFacts":
        from vllm.platforms import current_platform

        backend = vllm_config.attention_config.backend
        return cls(
            prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
            chunked_prefill=bool(vllm_config.scheduler_config.enable_chunked_prefill),
            async_scheduling=bool(vllm_config.scheduler_config.async_scheduling),
            kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
            speculative_decoding=vllm_config.speculative_config is not None,
            pipeline_parallel_size=vllm_config.parallel_config.pipeline_parallel_size,
            attention_backend=not current_platform.is_cuda() or str(backend).endswith("CUSTOM"),
            mm_processor_cache=bool(getattr(vllm_config.model_config.multimodal_config, "mm_processor_cache_gb", 0)),
        )

    def unmet(self, config: TokenZoomConfig) -> list[str]:
        """What ``config``'s policies need that this engine does not provide, one phrase each."""
        req, out = config.requirements, []

        def names(what: str) -> str:
            return ", ".join(repr(m) for m in config.needing(what))

        if req.prefix_caching_off and self.prefix_caching:
            out.append(f"{names('prefix_caching_off')} need prefix caching off; this server runs with it on")
        if req.one_step_prefill and self.chunked_prefill:
            out.append(f"{names('one_step_prefill')} need each prompt prefilled in one step; this server runs "
                       "with chunked prefill")
        if req.sync_scheduling and self.async_scheduling:
            out.append(f"{names('sync_scheduling')} need sync scheduling; this server runs with --async-scheduling")
        if req.kv_cache_dtypes is not None and self.kv_cache_dtype not in req.kv_cache_dtypes:
            out.append(f"{names('kv_cache_dtypes')} read the KV cache itself; this server's --kv-cache-dtype is "
                       f"{self.kv_cache_dtype!r} (allowed: {', '.join(map(repr, req.kv_cache_dtypes))})")
        if req.no_speculative_decoding and self.speculative_decoding:
            out.append(f"{names('no_speculative_decoding')} cannot run with this server's speculative decoding")
        if req.no_pipeline_parallel and self.pipeline_parallel_size > 1:
            out.append(f"{names('no_pipeline_parallel')} cannot run with pipeline parallelism")
        if req.no_mm_processor_cache and self.mm_processor_cache:
            out.append(f"{names('no_mm_processor_cache')} need the multimodal processor cache off; this server runs "
                       "with it on (--mm-processor-cache-gb)")
        if req.attention_backend and not self.attention_backend:
            out.append(f"{names('attention_backend')} need tokenzoom's attention backend, which this server "
                       "did not install (its own config has no in-LLM method)")
        return out


def engine_facts(hf_config) -> EngineFacts | None:
    facts = getattr(hf_config, ENGINE_ATTR, None)
    return None if facts is None else EngineFacts(**facts)


def load(value: Any) -> Any:
    """A request's raw setting (JSON string or mapping) -> the mapping under ``tokenzoom``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise TokenZoomConfigError(f"{XARG} is not valid JSON ({e.msg} at character {e.pos}); allowed: a JSON "
                                       "object of the engine's tokenzoom config schema, e.g. "
                                       '{"preset": "ttm"} or {"methods": {"ttm": {"prune_ratio": 0.5}}}') from None
    return value


def request_config(value: Any, server: TokenZoomConfig | None, facts: EngineFacts | None,
                   num_layers: int) -> TokenZoomConfig:
    """A request's tokenzoom setting, checked: parsed, against the model, the operator's
    ``per_request`` bound and this engine. Raises :class:`TokenZoomConfigError` naming the key,
    the value and what is allowed."""
    if server is None:
        raise TokenZoomConfigError(f"{XARG} was sent, but tokenzoom is not enabled on this server; start it with "
                                   "--plugin tokenzoom (or send the request without it)")
    raw = load(value)
    if isinstance(raw, Mapping) and "per_request" in raw:
        raise TokenZoomConfigError(f"{XARG}.per_request cannot be set by a request; it is the operator's setting")
    config = parse_config({CONFIG_KEY: raw})
    allowed = server.per_request
    if allowed is False:
        raise TokenZoomConfigError(f"this server does not take per-request {XARG} settings (its tokenzoom config "
                                   "sets per_request: false); send the request without it")
    if allowed is not True:
        refused = [m for m in config.methods if m not in allowed]
        if refused:
            raise TokenZoomConfigError(f"{XARG}: method(s) {', '.join(map(repr, refused))} not allowed on this "
                                       f"server; allowed: {', '.join(map(repr, allowed))}")
    config.for_model(num_layers)
    unmet = facts.unmet(config) if facts is not None else []
    if unmet:
        raise TokenZoomConfigError(f"{XARG}: this server cannot run the request's method(s): " + "; ".join(unmet)
                                   + ". Send methods this server runs (its own config's), or start a server for them")
    return config


def canonical(config: TokenZoomConfig) -> str:
    """The request's config as the one string every stage parses (and vLLM hashes)."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def parsed(text: str, num_layers: int, tokenizer=None) -> TokenZoomConfig:
    """A canonical string (checked where it entered) -> its config for the model."""
    return parse_config({CONFIG_KEY: json.loads(text)}).for_model(num_layers, tokenizer)


def from_extra_args(extra_args: Mapping[str, Any] | None) -> str | None:
    """The canonical string a request carries to the worker, or None (the engine's config)."""
    value = (extra_args or {}).get(XARG)
    return value if isinstance(value, str) else None


def entered(value: Any, model_config) -> str:
    """Where a request enters (server or offline): its setting checked against this engine,
    as the canonical string every stage reads."""
    from vllm_tokenzoom.models.llava_onevision import config_of

    hf_config = model_config.hf_config
    config = request_config(value, config_of(hf_config), engine_facts(hf_config),
                            hf_config.get_text_config().num_hidden_layers)
    return canonical(config)
