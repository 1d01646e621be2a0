"""What the request-entry patches do (``patches._patch_request_entry``): a per-request tokenzoom
setting checked and carried to the multimodal processor, on the server and offline."""
from __future__ import annotations

import inspect

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.requests import MM_KEY, XARG, entered


def with_request_setting(orig):
    """``OnlineRenderer.preprocess_*`` / ``render_responses``: the request's setting checked and put in
    its ``mm_processor_kwargs`` before rendering; its visual tokens counted after."""
    async def preprocess(self, request, *args, **kwargs):
        from vllm.exceptions import VLLMValidationError

        mm = dict(getattr(request, "mm_processor_kwargs", None) or {})
        xargs = getattr(request, "vllm_xargs", None) or {}
        if MM_KEY in mm and mm[MM_KEY] != xargs.get(XARG):  # equal: set here (a Responses turn renders again)
            raise VLLMValidationError(f"mm_processor_kwargs.{MM_KEY} is tokenzoom's own; send a per-request "
                                      f"setting as vllm_xargs.{XARG} (a JSON string)", parameter="mm_processor_kwargs")
        if XARG in xargs:
            try:
                text = entered(xargs[XARG], self.model_config)
            except TokenZoomConfigError as e:
                raise VLLMValidationError(f"vllm_xargs.{e}", parameter="vllm_xargs", value=xargs[XARG]) from None
            xargs[XARG] = text
            request.mm_processor_kwargs = {**mm, MM_KEY: text}
        rendered = await orig(self, request, *args, **kwargs)
        _count_visual_tokens(rendered, self.model_config, xargs.get(XARG))
        return rendered

    return preprocess


def _count_visual_tokens(rendered, model_config, text) -> None:
    """tokenzoom's metrics of a rendered request (``metrics.py``), when tokenzoom is on."""
    from vllm_tokenzoom.metrics import count_rendered
    from vllm_tokenzoom.models.llava_onevision import config_of

    config = config_of(model_config.hf_config, text=text)
    if config is not None:
        # chat: (conversation, inputs); responses: a result holding one engine input (or an error)
        inputs = rendered[1] if isinstance(rendered, tuple) else getattr(rendered, "engine_input", rendered)
        count_rendered(inputs if isinstance(inputs, (list, tuple)) else [inputs], model_config, config)


def one_by_one_with_setting(orig):
    """Offline ``LLM._add_*_requests``: a batch with per-request settings is added one request at a
    time, each with its own ``mm_processor_kwargs``."""
    first = list(inspect.signature(orig).parameters)[1]  # "prompts" or "messages" (vLLM passes them by name)

    def add(self, *args, **kwargs):
        from vllm.sampling_params import SamplingParams

        if args:
            kwargs.update(zip((first, "params"), args))
            args = args[2:]
        prompts, params = kwargs.pop(first), kwargs.pop("params")
        many = isinstance(params, (list, tuple))
        if not any(isinstance(p, SamplingParams) and XARG in (p.extra_args or {})
                   for p in (params if many else [params])):
            return orig(self, prompts, params, *args, **kwargs)
        seq = list(prompts) if _is_batch(prompts, orig.__name__) else [prompts]
        per = list(params) if many else [params] * len(seq)
        lora, priority = kwargs.pop("lora_request", None), kwargs.pop("priority", None)
        common = kwargs.pop("mm_processor_kwargs", None) or {}
        kwargs["use_tqdm"] = False
        ids = []
        for i, (prompt, p) in enumerate(zip(seq, per)):
            mm = dict(common)
            if isinstance(p, SamplingParams) and XARG in (p.extra_args or {}):
                text = entered(p.extra_args[XARG], self.model_config)
                p = p.clone()
                p.extra_args = {**p.extra_args, XARG: text}
                mm[MM_KEY] = text
            ids += orig(self, [prompt], [p], *args, mm_processor_kwargs=mm or None,
                        lora_request=lora[i] if isinstance(lora, (list, tuple)) else lora,
                        priority=priority[i] if isinstance(priority, (list, tuple)) else priority, **kwargs)
        return ids

    return add


def _is_batch(prompts, name: str) -> bool:
    """A sequence of prompts (completions) or of conversations (chat), not a single one."""
    if name == "_add_chat_requests":  # one conversation is a list of message dicts
        return isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], (list, tuple))
    return isinstance(prompts, (list, tuple)) and not (prompts and isinstance(prompts[0], int))
