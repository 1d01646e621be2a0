"""ZoomVLM's video overview augmenter as a dense reference (methods-spec §2.7; HF weights and
plain torch, no vLLM).

First pass: the overview (``VOA.apply`` on HF's own video features), greedy for s tokens; the
attention of the query of the forward that samples token #s, summed over the layer set (head
mean), chooses the keyframes (``methods.voa.choose_keyframes``). Second pass: the overview,
the keyframes at full resolution and the s tokens as the prompt, greedy for the rest, ATA
(if given) counting the sentence ends already among the s tokens.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_tokenzoom.methods.ata import ATA
from vllm_tokenzoom.methods.voa import VOA, choose_keyframes
from vllm_tokenzoom.reference.attention import reference_attention
from vllm_tokenzoom.reference.llava_onevision import DenseLlavaOnevision, ReferenceOutput


class ProbeReference:
    """Keeps, per forward, the last query's attention over the visual tokens summed over ``layers``."""

    name = "voa"

    def __init__(self, layers: range, visual_positions: torch.Tensor):
        self.layers, self.visual = layers, visual_positions
        self.scores = None

    def hidden(self, layer, query_positions, kv_len):
        return None

    def observe(self, layer, probs, query_positions):
        if layer in self.layers:
            mass = probs[:, -1, :].mean(0)[self.visual]  # [V] the sampling query, head mean
            self.scores = mass if layer == self.layers[0] else self.scores + mass
            self.position = int(query_positions[-1])


@torch.inference_mode()
def generate(dense: DenseLlavaOnevision, video, prompt: str, voa: VOA, max_new_tokens: int,
             ata: ATA | None = None) -> ReferenceOutput:
    """Both passes; ``tokens`` are all generated tokens, ``num_prompt_tokens`` both prompts',
    ``traces["voa"]``: [(the position after token #s, the keyframes)] (empty without a second pass)."""
    model = dense.model
    num_layers = model.config.text_config.num_hidden_layers
    voa = voa.for_model(num_layers)
    ids, inputs_embeds, plan = dense.prompt_embeds(video, prompt, voa)
    s = min(voa.probe_tokens, max_new_tokens)
    visual = (ids[0] == model.config.video_token_index).nonzero().squeeze(1)[:-1]  # but the newline
    probe = ProbeReference(range(voa.first_score_layer, voa.last_score_layer + 1), visual)
    with reference_attention(model, [probe]):
        first = model.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=s, min_new_tokens=s, eos_token_id=None,
                               pad_token_id=model.generation_config.pad_token_id)[0].tolist()
    n1 = ids.shape[1]
    if s < voa.probe_tokens or max_new_tokens == s:
        return ReferenceOutput(tokens=first, num_prompt_tokens=n1, kept=plan.source, traces={"voa": []})
    layers = voa.last_score_layer - voa.first_score_layer + 1
    chosen = choose_keyframes(probe.scores.float() / layers, plan.frame, voa.keyframes)
    if ata is not None:
        ata = ata.for_model(num_layers, dense.processor.tokenizer)
        ata = dataclasses.replace(ata, sentences=ata.sentences + sum(t in set(ata.sentence_end_ids) for t in first))
    second = dense.generate(video, prompt, dataclasses.replace(voa, chosen=chosen), max_new_tokens - s, ata=ata,
                            suffix=first)
    traces = {**second.traces, "voa": [(probe.position + 1, list(chosen))]}
    return ReferenceOutput(tokens=first + second.tokens, num_prompt_tokens=n1 + second.num_prompt_tokens,
                           kept=second.kept, traces=traces)
