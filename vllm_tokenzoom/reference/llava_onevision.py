"""HF-transformers LLaVA-OneVision with tokenzoom's pre-LLM stage applied densely.

The video goes through HF's own processor, vision tower, projector and pooling
(``get_video_features``); TTM then keeps tokens exactly as the paper describes
(``vllm_tokenzoom.methods.ttm``; a baseline of ``methods.baselines`` in its place works the
same way: the ``ttm`` argument takes any pre-LLM policy); the prompt's run of video placeholders is shortened to
match, and HF ``generate`` decodes greedily from the embeddings. This is what DyCoke's own
code does (features pruned before the sequence is built, positions contiguous).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_tokenzoom.kv.token_map import TokenMap
from vllm_tokenzoom.kv.view import visual_kv_share
from vllm_tokenzoom.methods.ata import ATA
from vllm_tokenzoom.methods.base import KeptTokens
from vllm_tokenzoom.methods.dp import DP
from vllm_tokenzoom.methods.fastv import FastV
from vllm_tokenzoom.methods.ttm import TTM
from vllm_tokenzoom.methods.vas import VAS
from vllm_tokenzoom.reference.ata import ATAReference
from vllm_tokenzoom.reference.attention import reference_attention
from vllm_tokenzoom.reference.dp import DPReference
from vllm_tokenzoom.reference.prefill import PrefillReference


@dataclass(frozen=True)
class ReferenceOutput:
    tokens: list[int]  # greedy new tokens
    num_prompt_tokens: int
    kept: torch.Tensor | None  # [K] source indices kept by the pre-LLM policy (None without one)
    # in-LLM method -> its decisions (see reference/<method>.py); with a prefill method also
    # "visual_kv_share", the layer-averaged share of the visual KV (methods-spec §0)
    traces: dict = field(default_factory=dict)

    @property
    def dp_trace(self) -> list | None:
        """Per decode step: (query position, visual indices layers >= L read, or None: all)."""
        return self.traces.get("dp")


@dataclass(frozen=True)
class GivenKept:
    """A pre-LLM step of the reference that keeps given tokens (the engine's TTM choice:
    :meth:`DenseLlavaOnevision.engine_ttm`)."""

    source: tuple[int, ...]  # source indices frame * N + cell, ascending

    def apply(self, frames: torch.Tensor) -> tuple[torch.Tensor, KeptTokens]:
        """frames: [T, N, D] -> (the given tokens [K, D], their frames and cells)."""
        kept = torch.tensor(self.source, dtype=torch.int64)
        return frames.flatten(0, 1)[kept], KeptTokens.from_source(kept, frames.shape[1])


class DenseLlavaOnevision:
    """Load once, generate many: ``DenseLlavaOnevision(model_dir).generate(video, prompt, ttm)``."""

    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()

    @torch.inference_mode()
    def video_embeddings(self, video: np.ndarray, ttm: TTM | None):
        """[T, H, W, 3] uint8 -> ([K + 1, D] embeddings incl. the newline, what was kept)."""
        cfg = self.model.config
        pixels = self.processor.video_processor(videos=[video], return_tensors="pt")["pixel_values_videos"]
        pooled = self.model.model.get_video_features(
            pixels.to(self.model.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output[0]  # [T*N + 1, D]
        num_frames = pixels.shape[1]
        tokens, newline = pooled[:-1], pooled[-1:]
        if ttm is None:
            return pooled, KeptTokens.every(num_frames, tokens.shape[0] // num_frames)
        kept_tokens, kept = ttm.apply(tokens.view(num_frames, tokens.shape[0] // num_frames, -1))
        return torch.cat((kept_tokens, newline)), kept

    def engine_ttm(self, video: np.ndarray, ttm: TTM, source, tol: float = 1e-6) -> "GivenKept":
        """The engine's TTM choice (``source``: the source indices it kept) as the pre-LLM step
        of :meth:`generate`, once checked to be this reference's choice up to rounding ties: a
        token one keeps and the other drops must have a similarity within ``tol`` of its frame's
        keep boundary (vLLM's and HF's vision towers differ at ~1e-6, and on the synthetic test
        videos TTM's ranking has ties of a few ulps there; DyCoke §3.2(1))."""
        pooled, every = self.video_embeddings(video, None)
        frames = pooled[:-1].view(-1, every.cells, pooled.shape[-1])  # [T, N, D]
        ours, theirs = ttm.plan(frames).tolist(), sorted(int(s) for s in source)
        assert len(theirs) == len(ours), f"the engine kept {len(theirs)} of the video's tokens, TTM keeps {len(ours)}"
        pruned, sim = ttm.similarities(frames)
        keep = ttm.tokens_kept_per_pruned_frame(every.cells)
        for index in sorted(set(ours) ^ set(theirs)):
            frame, cell = divmod(index, every.cells)
            assert frame in pruned, f"the engine's TTM choice differs in frame {frame}, which TTM keeps whole"
            row = sim[pruned.index(frame)]  # [N]
            ranked = row.sort().values
            boundary = (float(ranked[keep - 1]) + float(ranked[keep])) / 2  # in float64: exact
            assert abs(float(row[cell]) - boundary) <= tol, (
                f"the engine's TTM choice differs in frame {frame} at cell {cell}, similarity {float(row[cell]):.9f} "
                f"against the keep boundary {boundary:.9f}: more than rounding")
        return GivenKept(tuple(theirs))

    def prompt_embeds(self, video: np.ndarray, prompt: str, ttm: TTM | None, suffix: list[int] = ()):
        """-> (ids [1, L] with the video's placeholders, then ``suffix``; inputs_embeds [1, L, D];
        what was kept)."""
        embeds, kept = self.video_embeddings(video, ttm)
        video_id = self.model.config.video_token_index
        ids = self.processor.tokenizer(prompt, return_tensors="pt").input_ids[0]
        (at,) = (ids == video_id).nonzero(as_tuple=True)
        assert at.numel() == 1, "the reference takes a prompt with exactly one <video>"
        ids = torch.cat((ids[:at], torch.full((embeds.shape[0],), video_id), ids[at + 1:],
                         torch.tensor(list(suffix), dtype=ids.dtype)))[None]
        inputs_embeds = self.model.get_input_embeddings()(ids)
        inputs_embeds[ids == video_id] = embeds.to(inputs_embeds.dtype)
        return ids, inputs_embeds, kept

    @torch.inference_mode()
    def text_to_visual_attention(self, video: np.ndarray, prompt: str, ttm: TTM | None, layer: int) -> torch.Tensor:
        """[V]: attention each visual token (the video's newline excluded) gets at ``layer`` from
        the text queries after the video, averaged over heads and those queries (prefill)."""
        ids, inputs_embeds, _ = self.prompt_embeds(video, prompt, ttm)
        visual = (ids[0] == self.model.config.video_token_index).nonzero().squeeze(1)
        text_config = self.model.config.text_config
        previous, text_config._attn_implementation = text_config._attn_implementation, "eager"
        try:
            out = self.model.model.language_model(inputs_embeds=inputs_embeds, output_attentions=True)
        finally:
            text_config._attn_implementation = previous
        attention = out.attentions[layer][0].float().mean(0)  # [L, L], averaged over heads
        return attention[int(visual[-1]) + 1:, visual[:-1]].mean(0)

    @torch.inference_mode()
    def generate(self, video: np.ndarray, prompt: str, ttm: TTM | None = None, max_new_tokens: int = 16,
                 dp: DP | None = None, fastv: FastV | None = None, vas: VAS | None = None,
                 ata: ATA | None = None, suffix: list[int] = ()) -> ReferenceOutput:
        """Greedy decoding for a prompt with one ``<video>`` placeholder; EOS is ignored (as ``ignore_eos``).
        ``ttm`` prunes the video before the LLM, ``fastv`` or ``vas`` inside it during prefill,
        ``dp`` and ``ata`` during decode (``ata`` resolved with the model's tokenizer unless it
        names its sentence ends). ``suffix``: token ids after the prompt (VOA's second pass)."""
        ids, inputs_embeds, plan = self.prompt_embeds(video, prompt, ttm, suffix)
        kept = None if ttm is None else plan.source
        video_id = self.model.config.video_token_index
        kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=None,
                      pad_token_id=self.model.generation_config.pad_token_id)
        visual = (ids[0] == video_id).nonzero().squeeze(1)[:-1]  # the video's tokens but its newline
        n, num_layers = ids.shape[1], self.model.config.text_config.num_hidden_layers
        token_map = TokenMap.build(n, [(int(visual[0]), visual.numel() + 1)], [plan])
        hooks = [PrefillReference(name, policy.for_model(num_layers), token_map, num_layers)
                 for name, policy in (("fastv", fastv), ("vas", vas)) if policy is not None]
        hooks += [DPReference(dp, visual, n)] if dp is not None else []
        if ata is not None:
            hooks.append(ATAReference(ata.for_model(num_layers, self.processor.tokenizer), visual))
            kwargs["stopping_criteria"] = _hand_sampled_tokens(hooks[-1], max_new_tokens)
        if not hooks:
            out = self.model.generate(**kwargs)
            return ReferenceOutput(tokens=out[0].tolist(), num_prompt_tokens=n, kept=kept)
        with reference_attention(self.model, hooks):
            out = self.model.generate(**kwargs)
        traces = {h.name: h.trace for h in hooks}
        for hook in hooks:
            if isinstance(hook, PrefillReference):
                traces["visual_kv_share"] = visual_kv_share(hook.death, num_layers)
        return ReferenceOutput(tokens=out[0].tolist(), num_prompt_tokens=n, kept=kept, traces=traces)


def _hand_sampled_tokens(hook: ATAReference, max_new_tokens: int):
    """A stopping criterion that never stops: it hands each sampled token to ``hook`` (but the
    last: no forward reads a decision made after it, as in vLLM)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Sampled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            # HF generate with inputs_embeds: input_ids holds the new tokens only
            if input_ids.shape[1] < max_new_tokens:
                hook.sampled(int(input_ids[0, -1]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    return StoppingCriteriaList([Sampled()])
