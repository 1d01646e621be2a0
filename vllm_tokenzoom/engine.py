"""Engine settings checked against the union of the configured policies' requirements.

Called from ``EngineArgs.create_engine_config`` (``patches.py``), so ``vllm serve`` and
``LLM(...)`` refuse a configuration that cannot work before the model loads, with one
message naming the setting and what works. What tokenzoom may choose for the user (a
setting the user left at its default) it sets, and says so in the log:
- prefix caching off (blocks computed under a pruned view do not match their hashes);
- chunked prefill off for prefill-stage methods: the video and the text after it must be
  in one forward, so every prompt is prefilled in one step (vLLM then sizes
  ``max_num_batched_tokens`` to at least ``max_model_len``);
- async scheduling off for methods that decide from the token a step sampled (ATA, VOA);
- the multimodal processor cache off for VOA (its second pass is built from the first's
  processed video, which that cache would send to the engine only the first time);
- tokenzoom's attention backend on CUDA (the CPU platform always uses tokenzoom's override).
No method-specific branch here: each check reads ``Requirements`` fields.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vllm_tokenzoom.errors import TokenZoomConfigError

logger = logging.getLogger("vllm.tokenzoom")

MODEL_ARCH = "LlavaOnevisionForConditionalGeneration"  # the architecture tokenzoom registers its model under
SUPPORTED_ARCHS = (MODEL_ARCH,)
HF_CONFIG_ATTR = "tokenzoom"  # where the model and its processor find the resolved config


def create_engine_config(engine_args, orig_create, *args, **kwargs):
    """``EngineArgs.create_engine_config`` for an engine with a tokenzoom config: the config parsed
    and the vLLM version checked, the engine settings fitted to it, vLLM's config built and the
    model checked against it; the resolved config reaches the model and its processor through
    ``hf_overrides``, the facts a per-request setting is checked against through the HF config."""
    from vllm_tokenzoom.config import parse_config
    from vllm_tokenzoom.requests import ENGINE_ATTR, EngineFacts
    from vllm_tokenzoom.version import check_vllm_version

    config = parse_config(engine_args.additional_config)
    check_vllm_version()
    engine_args.hf_overrides = _with_tokenzoom(engine_args.hf_overrides, config.to_dict())
    fit_engine_args(engine_args, config)
    try:
        vllm_config = orig_create(engine_args, *args, **kwargs)
    except ValueError as e:
        refuse_batched_tokens(config, e)
        raise
    _check_architecture(vllm_config.model_config.architectures)
    check_model(config, vllm_config)
    # in every process of the engine (requests.py)
    setattr(vllm_config.model_config.hf_config, ENGINE_ATTR, dataclasses.asdict(EngineFacts.of(vllm_config)))
    logger.info("tokenzoom enabled: %s", config.to_dict())
    return vllm_config


def _names(methods: list[str]) -> str:
    return ", ".join(repr(m) for m in methods)


def fit_engine_args(engine_args, config) -> None:
    """Before vLLM builds its config: refuse what cannot work, set what tokenzoom needs."""
    req = config.requirements
    if req.prefix_caching_off:
        methods = config.needing("prefix_caching_off")
        if engine_args.enable_prefix_caching:
            raise TokenZoomConfigError(
                f"tokenzoom method(s) {_names(methods)} cannot run with prefix caching: blocks computed under a "
                "pruned view do not match their hashes; drop --enable-prefix-caching (tokenzoom turns it off), "
                "or use a method that keeps it (e.g. the 'ttm' preset)")
        engine_args.enable_prefix_caching = False
    if req.one_step_prefill:
        methods = config.needing("one_step_prefill")
        if engine_args.enable_chunked_prefill:
            raise TokenZoomConfigError(
                f"tokenzoom method(s) {_names(methods)} need each video and the text after it in one prefill "
                "step, which chunked prefill can split; drop --enable-chunked-prefill (tokenzoom turns it off "
                "and vLLM then prefills every prompt up to max_model_len in one step)")
        if not engine_args.enable_chunked_prefill:
            logger.info("tokenzoom: chunked prefill off for %s (each prompt is prefilled in one step)", _names(methods))
        engine_args.enable_chunked_prefill = False
    if req.kv_cache_dtypes is not None and engine_args.kv_cache_dtype not in req.kv_cache_dtypes:
        raise TokenZoomConfigError(
            f"--kv-cache-dtype {engine_args.kv_cache_dtype!r} cannot run with tokenzoom method(s) "
            f"{_names(config.needing('kv_cache_dtypes'))}, whose kernels read the KV cache itself; "
            f"allowed: {_names(list(req.kv_cache_dtypes))}")
    if req.no_speculative_decoding and engine_args.speculative_config:
        raise TokenZoomConfigError(
            f"speculative decoding (--speculative-config) cannot run with tokenzoom method(s) "
            f"{_names(config.needing('no_speculative_decoding'))}: they decide from the query of each step, "
            "and draft positions are not decided tokens; drop one or the other")
    if req.no_pipeline_parallel and (engine_args.pipeline_parallel_size or 1) > 1:
        raise TokenZoomConfigError(
            f"--pipeline-parallel-size {engine_args.pipeline_parallel_size} cannot run with tokenzoom method(s) "
            f"{_names(config.needing('no_pipeline_parallel'))}: a decision at one layer must reach the layers "
            "of every stage; allowed: 1 (tensor parallelism works)")
    if req.no_micro_batching and engine_args.enable_dbo:
        raise TokenZoomConfigError(
            f"--enable-dbo cannot run with tokenzoom method(s) {_names(config.needing('no_micro_batching'))}: "
            "a micro-batch's attention metadata does not say which request each row is, so their token views "
            "could not be applied; drop --enable-dbo")
    if req.sync_scheduling:
        methods = config.needing("sync_scheduling")
        if engine_args.async_scheduling:
            raise TokenZoomConfigError(
                f"--async-scheduling cannot run with tokenzoom method(s) {_names(methods)}: they decide from the "
                "token each step sampled before the next step starts; drop --async-scheduling (tokenzoom turns it off)")
        engine_args.async_scheduling = False
    if req.no_mm_processor_cache:
        _no_mm_processor_cache(engine_args, config.needing("no_mm_processor_cache"))
    if req.attention_backend:
        _cuda_backend(engine_args, config.needing("attention_backend"))


def _no_mm_processor_cache(engine_args, methods: list[str]) -> None:
    from vllm.config.multimodal import MultiModalConfig

    size = engine_args.mm_processor_cache_gb
    if size and size != MultiModalConfig.mm_processor_cache_gb:  # asked for by the user
        raise TokenZoomConfigError(
            f"--mm-processor-cache-gb {size} cannot run with tokenzoom method(s) {_names(methods)}: the second "
            "pass is built from each request's processed video, which that cache sends to the engine only "
            "once; drop --mm-processor-cache-gb (tokenzoom sets it to 0)")
    if size:
        logger.info("tokenzoom: multimodal processor cache off for %s", _names(methods))
    engine_args.mm_processor_cache_gb = 0


def _cuda_backend(engine_args, methods: list[str]) -> None:
    """On CUDA, in-LLM methods need tokenzoom's backend (CUSTOM) and vLLM's V1 model runner
    (the row -> request hook; ``patches._patch_model_runner_choice`` picks it for such an
    engine, no process environment is changed); not run on a GPU yet, see triton_attn.py."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return
    from vllm import envs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def custom(backend) -> bool:
        return backend is None or backend == AttentionBackendEnum.CUSTOM or str(backend).endswith("CUSTOM")

    chosen = engine_args.attention_backend
    config = engine_args.attention_config
    in_config = config.get("backend") if isinstance(config, dict) else getattr(config, "backend", None)
    for flag, backend in (("--attention-backend", chosen), ("--attention-config.backend", in_config)):
        if not custom(backend):
            raise TokenZoomConfigError(
                f"{flag} {getattr(backend, 'name', backend)} cannot run with tokenzoom method(s) {_names(methods)}: they need tokenzoom's "
                f"attention backend (CUSTOM), which reads the token view; drop {flag}")
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise TokenZoomConfigError(
            f"VLLM_USE_V2_MODEL_RUNNER=1 cannot run with tokenzoom method(s) {_names(methods)}: they need vLLM's "
            "V1 model runner (tokenzoom picks it for this engine); unset VLLM_USE_V2_MODEL_RUNNER")
    if in_config is None:  # vLLM refuses both set at once
        engine_args.attention_backend = AttentionBackendEnum.CUSTOM


def refuse_batched_tokens(config, error: ValueError) -> None:
    """vLLM's own refusal of a ``max_num_batched_tokens`` below ``max_model_len`` (chunked
    prefill off), said as what it means for tokenzoom."""
    if config.requirements.one_step_prefill and "max_num_batched_tokens" in str(error):
        raise TokenZoomConfigError(
            f"tokenzoom method(s) {_names(config.needing('one_step_prefill'))} prefill each prompt in one step, "
            f"so --max-num-batched-tokens must be at least --max-model-len ({error}); raise "
            "--max-num-batched-tokens (or leave it unset) or lower --max-model-len") from None


def check_model(config, vllm_config) -> None:
    """Every policy's settings against the model (e.g. a layer index within its layers)."""
    config.for_model(vllm_config.model_config.hf_text_config.num_hidden_layers)


def enable_in(additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """``--plugin tokenzoom``: keep the user's tokenzoom config, else the default preset."""
    from vllm_tokenzoom.config import CONFIG_KEY

    additional_config = dict(additional_config or {})
    additional_config.setdefault(CONFIG_KEY, {})
    return additional_config


def _with_tokenzoom(hf_overrides, resolved: dict[str, Any]):
    if callable(hf_overrides):
        def chained(hf_config, _user=hf_overrides):
            hf_config = _user(hf_config)
            setattr(hf_config, HF_CONFIG_ATTR, resolved)
            return hf_config

        return chained
    return {**(hf_overrides or {}), HF_CONFIG_ATTR: resolved}


def _check_architecture(architectures) -> None:
    if not any(a in SUPPORTED_ARCHS for a in architectures or ()):
        raise TokenZoomConfigError(
            f"tokenzoom does not support model architecture(s) {list(architectures or [])}; "
            f"supported: {', '.join(SUPPORTED_ARCHS)} (LLaVA-OneVision). Remove the 'tokenzoom' key "
            "from additional_config (or --plugin tokenzoom) to serve this model without tokenzoom."
        )


def needs_v1_runner(additional_config) -> bool:
    """Whether an engine of this ``additional_config`` must run vLLM's V1 model runner: tokenzoom's
    in-LLM methods on CUDA."""
    if not isinstance(additional_config, dict) or "tokenzoom" not in additional_config:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False
    from vllm_tokenzoom.config import parse_config

    return parse_config(additional_config).requirements.attention_backend
