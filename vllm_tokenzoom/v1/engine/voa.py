"""VOA's two passes behind one request (ZoomVLM §4.2, App. E Alg. 1; methods-spec §2.6
"Orchestration"; docs/architecture.md "Around the request").

A request whose config has ``voa`` (keyframes not chosen yet) enters the engine as its first
pass: the video rendered as the overview, ``max_tokens = s``. The worker's probe chooses the
keyframes in the forward that samples token #s and hands them back on that request's output
(``kv_transfer_params["tokenzoom"]["voa"]``). If the first pass ran its s tokens and the user
asked for more, the second pass enters under the same request id: the same processed video
with the keyframes chosen (its placeholder run longer by k frames, its multimodal hash
distinct), the s tokens appended to the prompt, the request's decode methods (ATA, with the
sentence ends already among the s tokens). The first pass has ended (its KV freed) when the
second is added. The caller sees one request: the first pass's tokens as they come, then the
second's; ``usage`` counts both passes (``prompt_token_ids``: the first pass's prompt, then the
second's).

:class:`Passes` is the pure part (what the second pass is, how outputs merge); the engine
entry points (``AsyncLLM.generate``, ``LLMEngine.add_request`` / ``step``) are patched in
``patches.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass

from vllm_tokenzoom import requests
from vllm_tokenzoom.v1.core.sched.scheduler import RESULTS_KEY


def _validation_error(message: str):
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter="vllm_xargs")


@dataclass
class Passes:
    """One VOA request: its config (resolved for the model, no tokenizer), the user's params, the
    first pass's, and what the first pass generated so far (gathered from its outputs, of any kind)."""

    config: object  # TokenZoomConfig
    params: object  # the user's SamplingParams
    first_params: object  # the first pass's
    tokens: list = dataclasses.field(default_factory=list)  # the first pass's tokens so far
    text: str = ""
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    first_prompt: list = dataclasses.field(default_factory=list)

    @property
    def voa(self):
        return self.config.methods["voa"]

    @classmethod
    def of(cls, engine, prompt, params, tokenization_kwargs=None) -> "tuple[Passes | None, object]":
        """(The request's passes, or None when it is not a VOA request with one video; the
        prompt, rendered if it came raw: the passes are built from the rendered input)."""
        from vllm.sampling_params import SamplingParams

        from vllm_tokenzoom.models.llava_onevision import config_of

        if not isinstance(params, SamplingParams):
            return None, prompt
        config = config_of(engine.model_config.hf_config, text=requests.from_extra_args(params.extra_args))
        voa = None if config is None else config.methods.get("voa")
        if voa is None or voa.chosen is not None:
            return None, prompt
        prompt = _rendered(engine, prompt, tokenization_kwargs)
        if not isinstance(prompt, dict) or prompt.get("type") != "multimodal":
            return None, prompt
        places = prompt["mm_placeholders"]
        if list(places) != ["video"] or len(places["video"]) != 1:
            raise _validation_error(f"voa takes one video and no other media per request; this one has "
                                    f"{ {m: len(p) for m, p in places.items()} }")
        if params.n != 1:
            raise _validation_error(f"voa generates one answer per request; n = {params.n} (allowed: 1)")
        s = voa.probe_tokens
        first = params.clone()
        first.max_tokens = s if params.max_tokens is None else min(s, params.max_tokens)
        first.min_tokens = min(params.min_tokens, first.max_tokens)
        passes = cls(config, params, first)
        passes.check_fits(prompt, engine.model_config, engine.input_processor.mm_encoder_cache_size)
        return passes, prompt

    def check_fits(self, prompt: dict, model_config, encoder_cache_size: int) -> None:
        """Refuse at the request, before any pass runs, a second pass the engine could not take
        (its prompt over ``max_model_len``, its video over vLLM's encoder cache)."""
        from vllm_tokenzoom.models.llava_onevision import frame_tokens

        (place,) = prompt["mm_placeholders"]["video"]
        (item,) = prompt["mm_kwargs"]["video"]
        num_frames = int(item["pixel_values_videos"].data.shape[0])
        keyframes = min(self.voa.keyframes, len(self.voa.overview_frames(num_frames)))
        video = place.length + keyframes * frame_tokens(model_config.hf_config)
        length = len(prompt["prompt_token_ids"]) - place.length + video + self.voa.probe_tokens
        if length > model_config.max_model_len:
            raise _validation_error(f"voa: the second pass's prompt would be {length} tokens (the overview, "
                                    f"{self.voa.keyframes} keyframes and {self.voa.probe_tokens} tokens), over "
                                    f"--max-model-len {model_config.max_model_len}; raise it, or send fewer "
                                    "keyframes (voa.keyframes)")
        if video > encoder_cache_size:
            raise _validation_error(f"voa: the second pass's video would be {video} tokens, over vLLM's encoder "
                                    f"cache of {encoder_cache_size}; raise --max-num-batched-tokens (it sizes that "
                                    "cache) to at least that, or send fewer keyframes (voa.keyframes)")

    def seen(self, out) -> None:
        """Gather a first-pass output (cumulative and final outputs hold all so far, deltas the new)."""
        from vllm.sampling_params import RequestOutputKind

        done = out.outputs[0]
        if self.params.output_kind != RequestOutputKind.DELTA:
            self.tokens, self.text, self.logprobs = [], "", None
        self.tokens += list(done.token_ids)
        self.text += done.text
        if done.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(done.logprobs)
        self.cumulative_logprob = done.cumulative_logprob
        self.first_prompt = list(out.prompt_token_ids or [])

    def ended(self, prompt: dict, first_out, tokenizer) -> tuple[object, tuple | None]:
        """The first pass ended with ``first_out``: (its last output as the caller sees it, or None;
        the second pass's (engine input, params), or None when there is none)."""
        goes_on = self.goes_on(first_out)
        second = self.second(prompt, first_out, tokenizer) if goes_on else None  # reads the keyframes first
        return self.shown_first(first_out, goes_on), second

    def goes_on(self, first_out) -> bool:
        """Whether the second pass runs: the first ran its s tokens, and the user wants more."""
        s = self.voa.probe_tokens
        return (first_out.outputs[0].finish_reason == "length" and len(self.tokens) == s
                and (self.params.max_tokens is None or self.params.max_tokens > s))

    def second(self, prompt: dict, first_out, tokenizer) -> tuple[dict, object]:
        """-> (the second pass's engine input, its sampling params)."""
        from vllm.multimodal.inputs import MultiModalKwargsItem, MultiModalKwargsItems, PlaceholderRange

        result = (first_out.kv_transfer_params or {}).get(RESULTS_KEY, {}).get("voa")
        if result is None:
            raise RuntimeError(f"voa: the first pass of request {first_out.request_id} ended without keyframes")
        text = requests.canonical(self.second_config(result["keyframes"], tokenizer))
        (place,) = prompt["mm_placeholders"]["video"]
        if place.is_embed is not None:
            raise ValueError("voa: a video placeholder run with non-embedding tokens is not supported")
        extra = len(result["keyframes"]) * result["frame_tokens"]
        ids = list(prompt["prompt_token_ids"])
        end = place.offset + place.length - 1  # the video's newline
        ids = ids[:end] + [ids[place.offset]] * extra + ids[end:] + self.tokens
        (item,) = prompt["mm_kwargs"]["video"]
        item = MultiModalKwargsItem({**item, requests.PRE_LLM_FIELD: _code_elem(text)})
        (digest,) = prompt["mm_hashes"]["video"]
        second = {**prompt, "prompt_token_ids": ids,
                  "mm_kwargs": MultiModalKwargsItems({"video": [item]}),
                  "mm_hashes": {"video": [f"{digest}-voa-{hashlib.sha256(text.encode()).hexdigest()[:16]}"]},
                  "mm_placeholders": {"video": [PlaceholderRange(place.offset, place.length + extra)]}}
        params = self.params.clone()
        s = len(self.tokens)
        params.max_tokens = None if params.max_tokens is None else params.max_tokens - s
        params.min_tokens = max(0, params.min_tokens - s)
        params.extra_args = {**(params.extra_args or {}), requests.XARG: text}
        return second, params

    def second_config(self, keyframes, tokenizer):
        """The request's config with the keyframes chosen, and ATA counting the sentence ends
        already among the first pass's tokens (methods-spec §2.4.9)."""
        methods = dict(self.config.methods)
        methods["voa"] = dataclasses.replace(self.voa, chosen=tuple(keyframes))
        ata = methods.get("ata")
        if ata is not None:
            ends = set(ata.sentence_end_ids) if ata.sentence_end_ids is not None else _sentence_ends(tokenizer)
            methods["ata"] = dataclasses.replace(ata, sentences=ata.sentences + sum(t in ends for t in self.tokens))
        return dataclasses.replace(self.config, methods=methods)

    # -- what the caller sees ------------------------------------------------------------------
    def shown_first(self, first_out, goes_on: bool):
        """The first pass's last output as the caller sees it (None: nothing to show yet)."""
        from vllm.sampling_params import RequestOutputKind

        out = _without_results(first_out)
        if not goes_on:
            return out
        if self.params.output_kind == RequestOutputKind.FINAL_ONLY:
            return None
        out.finished = False
        out.outputs = [dataclasses.replace(out.outputs[0], finish_reason=None, stop_reason=None)]
        return out

    def merged(self, out):
        """A second-pass output as the caller sees it: after the first pass's tokens (cumulative
        kinds), its prompt after the first pass's prompt (``usage`` counts both passes)."""
        from vllm.sampling_params import RequestOutputKind

        out.prompt_token_ids = self.first_prompt + list(out.prompt_token_ids or [])
        if self.params.output_kind != RequestOutputKind.DELTA:
            b = out.outputs[0]
            out.outputs = [dataclasses.replace(
                b, text=self.text + b.text, token_ids=self.tokens + list(b.token_ids),
                logprobs=None if self.logprobs is None or b.logprobs is None else self.logprobs + list(b.logprobs),
                cumulative_logprob=None if self.cumulative_logprob is None or b.cumulative_logprob is None
                else self.cumulative_logprob + b.cumulative_logprob)]
        return out


def _rendered(engine, prompt, tokenization_kwargs):
    """A raw prompt (text, or a dict of prompt and multi_modal_data) rendered as vLLM's input
    processor renders it (its deprecated raw-prompt path); a rendered one as it is."""
    if isinstance(prompt, dict) and "type" in prompt or not isinstance(prompt, (str, dict)):
        return prompt
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    renderer = engine.input_processor.renderer
    params = renderer.default_cmpl_tok_params.with_kwargs(**(tokenization_kwargs or {}))
    (rendered,) = renderer.render_cmpl([parse_model_prompt(engine.model_config, prompt)], params)
    return rendered


def _code_elem(text: str):
    import torch
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem

    code = torch.tensor(list(text.encode()), dtype=torch.uint8)  # [L] as the processor writes it
    return MultiModalFieldElem(data=code, field=MultiModalBatchedField(keep_on_cpu=True))


def _without_results(out):
    params = dict(out.kv_transfer_params or {})
    params.pop(RESULTS_KEY, None)
    out.kv_transfer_params = params or None
    return out


@functools.lru_cache(maxsize=4)
def _sentence_ends_of(tokenizer) -> frozenset[int]:
    from vllm_tokenzoom.methods.ata import sentence_end_ids

    return frozenset(sentence_end_ids(tokenizer))


def _sentence_ends(tokenizer) -> frozenset[int]:
    if tokenizer is None:
        raise RuntimeError("voa with ata: counting the first pass's sentence ends needs the tokenizer")
    return _sentence_ends_of(tokenizer)


# -- the engine entry points (patched in patches.py) ---------------------------------------------
def async_generate(orig):
    """``AsyncLLM.generate``: a VOA request's two passes as one stream of outputs."""

    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        passes, prompt = Passes.of(self, prompt, sampling_params, kwargs.get("tokenization_kwargs"))
        if passes is None:
            async for out in orig(self, prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        first = None
        async for out in orig(self, prompt, passes.first_params, request_id, *args, **kwargs):
            passes.seen(out)
            if out.finished:
                first = out
                break
            yield out
        if first is None:
            return
        shown, second = passes.ended(prompt, first, self.tokenizer)
        if shown is not None:
            yield shown
        if second is None:
            return
        async for out in orig(self, *second, request_id, *args, **kwargs):
            yield passes.merged(out)

    return generate


def engine_add_request(orig):
    """``LLMEngine.add_request``: a VOA request enters as its first pass (remembered for ``step``)."""

    def add_request(self, request_id, prompt, params, *args, **kwargs):
        passes, prompt = Passes.of(self, prompt, params, kwargs.get("tokenization_kwargs"))
        if passes is None:
            return orig(self, request_id, prompt, params, *args, **kwargs)
        if not hasattr(self, "tokenzoom_passes"):
            self.tokenzoom_passes = {}
        self.tokenzoom_passes[request_id] = (passes, prompt, args, kwargs, False)
        return orig(self, request_id, prompt, passes.first_params, *args, **kwargs)

    return add_request


def engine_step(orig, add_request):
    """``LLMEngine.step``: a first pass that ends adds the second; outputs as one request's.
    ``add_request``: the unpatched one."""

    def step(self):
        outputs = orig(self)
        pending = getattr(self, "tokenzoom_passes", None)
        if not pending:
            return outputs
        shown = []
        for out in outputs:
            entry = pending.get(out.request_id)
            if entry is None:
                shown.append(out)
                continue
            passes, prompt, args, kwargs, second = entry
            if second:  # the second pass's output
                if out.finished:
                    del pending[out.request_id]
                shown.append(passes.merged(out))
                continue
            passes.seen(out)
            if not out.finished:
                shown.append(out)
                continue
            view, second = passes.ended(prompt, out, self.tokenizer)
            if second is not None:
                add_request(self, out.request_id, *second, *args, **kwargs)
                pending[out.request_id] = (passes, prompt, args, kwargs, True)
            else:
                del pending[out.request_id]
            if view is not None:
                shown.append(view)
        return shown

    return step
