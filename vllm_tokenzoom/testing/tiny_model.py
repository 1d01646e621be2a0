"""Build a random LLaVA-OneVision checkpoint offline, loadable by vLLM 0.32 and HF transformers.

    python -m vllm_tokenzoom.testing.tiny_model --out DIR [--preset tiny|tiny-deep|qwen2-0.5b] [--seed N]

Presets (all: SigLIP at 384 px, patch 14 -> 27x27 patches -> 2x2 bilinear pooling ->
196 tokens per frame, as the real model):
- ``tiny``: Qwen2 LM with 4 layers, hidden 128, 4 heads (head size 32), 2 KV heads;
  a 2-layer SigLIP of width 64. A few MB, for tests.
- ``tiny-deep``: ``tiny`` with 12 LM layers, for methods that act across many layers (VAS's
  defaults start scoring at layer 2 and end at the last layer index - 4).
- ``qwen2-0.5b``: Qwen2-0.5B's text shape (24 layers, hidden 896, 14 heads, 2 KV heads,
  intermediate 4864, 151936 embedding rows) and a 4-layer SigLIP of width 384, for benchmarks.

Weights are random but scaled so that every layer matters and greedy output depends on
the video (HF's default init makes a model that repeats its last prompt token). The same
seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

IMAGE_SIZE, PATCH = 384, 14
PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    ),
    "tiny-deep": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=2),
    ),
    "qwen2-0.5b": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936),
    ),
}
# same pinpoints as llava-onevision-qwen2-*-ov-hf
PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


def build_config(preset: str, tokenizer):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    spec = PRESETS[preset]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>", "<|im_end|>", "<|endoftext|>")}
    vision = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=False, **spec["vision"])
    text = Qwen2Config(**{"vocab_size": len(tokenizer), **spec["text"]}, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                       use_sliding_window=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False,
        multimodal_projector_bias=True,
    )
    config.vision_config.model_type = "siglip_vision_model"
    return config


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Scaled random init: every Linear ~ N(0, 1/fan_in), embeddings ~ N(0, 1).

    Each layer then adds an O(1) update to the residual stream, and the LM's query and
    key projections are 2x larger, so attention is sharp: individual visual tokens, not
    just their average, decide the reply (different videos, different replies). Not
    sharper: at 3x most visual tokens get < 1e-7 of the attention, and DyCoke's top-k
    among them is decided by fp32 rounding (kept/dropped boundary gaps of 1e-5, relative);
    at 2x those gaps are ~1e-3.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
            continue  # keep norms at 1 / 0
        if p.dim() >= 2:
            fan_in = math.prod(p.shape[1:])
            std = 1.0 if "embed_tokens" in name or "position_embedding" in name else fan_in ** -0.5
            if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                std *= 2.0
        else:
            std = 1.0 if name.endswith("image_newline") else 0.02
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_processor(tokenizer):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    mean = std = [0.5, 0.5, 0.5]  # as in llava-onevision-qwen2-*-ov-hf
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS, image_mean=mean,
                                                     image_std=std, do_pad=True, do_convert_rgb=True),
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=mean, image_std=std, do_convert_rgb=True),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        num_image_tokens=(IMAGE_SIZE // PATCH) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def save_weights(model, out: Path) -> None:
    """Write model.safetensors in the llava-hf hub layout vLLM 0.32 loads.

    transformers 5.x names the SigLIP tower ``model.vision_tower.embeddings...``; vLLM's
    SiglipVisionModel wants ``...vision_tower.vision_model.embeddings...`` (what the hub
    checkpoints use). HF transformers loads both.
    """
    from safetensors.torch import save_file

    prefix = "model.vision_tower."
    state = {
        (prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) else k): v.contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(dict(sorted(state.items())), str(out / "model.safetensors"), metadata={"format": "pt"})


def build(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    from transformers import LlavaOnevisionForConditionalGeneration

    from vllm_tokenzoom.testing.tokenizer import build_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    config = build_config(preset, tokenizer)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    init_weights(model, seed)
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    model.generation_config.update(eos_token_id=eos, pad_token_id=pad, bos_token_id=pad)
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_weights(model, out)
    build_processor(tokenizer).save_pretrained(out)
    (out / "tokenzoom_model.json").write_text(json.dumps({"preset": preset, "seed": seed}, indent=1) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = build(args.out, args.preset, args.seed)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {args.preset} LLaVA-OneVision (seed {args.seed}) to {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
