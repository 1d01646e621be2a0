"""The offline checkpoints: loadable, deterministic, shaped like the real model, video-sensitive."""
import json
from pathlib import Path

from vllm_tokenzoom.testing.tiny_model import build, build_config
from vllm_tokenzoom.testing.tokenizer import build_tokenizer
from vllm_tokenzoom.testing.video import make_video


def test_same_seed_same_files(tmp_path, tiny_model):
    again = build(tmp_path / "again", preset="tiny", seed=0)
    other = build(tmp_path / "other", preset="tiny", seed=1)
    names = sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (Path(tiny_model) / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_tiny_is_llava_onevision_shaped(tiny_model, dense):
    cfg = json.loads((Path(tiny_model) / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    text = cfg["text_config"]
    assert text["num_hidden_layers"] >= 4  # DyCoke's default layer L=3 exists
    assert text["hidden_size"] // text["num_attention_heads"] == 32
    assert cfg["vision_config"]["image_size"] == 384 and cfg["vision_config"]["patch_size"] == 14
    ids = dense.processor(text="<video>", videos=[make_video(3)], return_tensors="pt").input_ids
    assert int((ids == cfg["video_token_index"]).sum()) == 3 * 196 + 1  # 196 tokens per frame + 1 newline


def test_qwen2_05b_preset_has_qwen2_05b_text_shape():
    text = build_config("qwen2-0.5b", build_tokenizer(0)).text_config
    shape = (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
             text.intermediate_size, text.vocab_size)
    assert shape == (24, 896, 14, 2, 4864, 151936)


def test_tokenizer_has_llava_onevision_specials_and_chat_template(dense):
    tok = dense.processor.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<video>", "<image>", "<|endoftext|>"):
        assert len(tok(special).input_ids) == 1
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}},
                                             {"type": "text", "text": "What moves?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<video>\nWhat moves?<|im_end|>\n<|im_start|>assistant\n" in text


def test_different_videos_give_different_replies(dense, prompt):
    replies = {tuple(dense.generate(make_video(8, seed=s), prompt, None, max_new_tokens=6).tokens) for s in range(4)}
    assert len(replies) >= 3
