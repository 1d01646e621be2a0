"""tokenzoom never lowers what a request may carry below vanilla vLLM's (issue #13 item 3): with
the same flags, every video vanilla's input processor accepts, tokenzoom's accepts too (its encoder
cache is sized from vLLM's own counts, not from the pruned ones). Checked with vLLM's real
``InputProcessor`` -- the front end's admission checks -- around the limits where vanilla refuses."""
import pytest
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor

from vllm_tokenzoom.testing.video import chat_prompt, make_video

FRAMES = (16, 24, 32, 40, 48, 64)


def _admitted(model: str, additional_config: dict, max_model_len: int,
              max_num_batched_tokens: int) -> dict[int, bool | str]:
    """Per frame count: admitted, or vLLM's refusal."""
    config = EngineArgs(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True,
                        max_num_batched_tokens=max_num_batched_tokens,
                        additional_config=additional_config).create_engine_config()
    processor = InputProcessor(config)
    prompt = chat_prompt(processor.renderer.get_tokenizer())
    out = {}
    for frames in FRAMES:
        video = make_video(frames, 64, 64, seed=frames)
        try:
            processor.process_inputs(f"r{frames}", {"prompt": prompt, "multi_modal_data": {"video": video}},
                                     SamplingParams(max_tokens=1), ("generate",))
            out[frames] = True
        except (ValueError, VLLMValidationError) as e:
            out[frames] = str(e)
    return out


# vanilla's limit there: the prompt's length (--max-model-len), or the encoder cache (a video's
# tokens; vLLM sizes it from --max-num-batched-tokens and its most expensive dummy video)
LIMITS = {(8192, 2048): "longer than the maximum model length", (8192, 8192): "longer than the maximum model length",
          (16384, 2048): "exceeds the pre-allocated encoder cache size"}


@pytest.mark.parametrize("max_model_len,max_num_batched_tokens", list(LIMITS))
@pytest.mark.parametrize("preset", ["ttm", "dycoke", "cascade", "zoomvlm"])
def test_tokenzoom_admits_every_video_vanilla_admits(tiny_deep_model, preset, max_model_len, max_num_batched_tokens):
    if preset == "cascade" and max_num_batched_tokens < max_model_len:
        pytest.skip("an in-LLM method prefills in one step: refused at start-up below --max-model-len")
    vanilla = _admitted(tiny_deep_model, {}, max_model_len, max_num_batched_tokens)
    refusals = [v for v in vanilla.values() if v is not True]
    assert refusals and LIMITS[max_model_len, max_num_batched_tokens] in refusals[-1], vanilla  # limits reached
    zoom = _admitted(tiny_deep_model, {"tokenzoom": {"preset": preset}}, max_model_len, max_num_batched_tokens)
    assert [f for f in FRAMES if vanilla[f] is True and zoom[f] is not True] == [], (vanilla, zoom)
