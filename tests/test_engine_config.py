"""Bad server or engine config is refused before the model loads, with a message naming it."""
import json
import os
import subprocess
import sys

import pytest

from vllm_tokenzoom.errors import TokenZoomConfigError
from vllm_tokenzoom.testing.offline import ENV
from vllm_tokenzoom.testing.server import cpu_serve_args, vllm_cli


def _llm_error(model: str, additional_config: dict, **kwargs) -> subprocess.CompletedProcess:
    code = (
        "import json, sys\n"
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        "    LLM(model=sys.argv[1], dtype='float32', max_model_len=8192, enforce_eager=True,\n"
        "        additional_config=json.loads(sys.argv[2]), **json.loads(sys.argv[3]))\n"
        "    print('ENGINE STARTED')\n"
    )
    return subprocess.run([sys.executable, "-c", code, model, json.dumps(additional_config), json.dumps(kwargs)],
                          capture_output=True, text=True, env={**__import__("os").environ, **ENV}, timeout=300)


def test_offline_llm_raises_the_config_error(tiny_model):
    proc = _llm_error(tiny_model, {"tokenzoom": {"methods": {"ttm": {"prune_ratio": 1.5}}}})
    assert proc.returncode != 0 and "ENGINE STARTED" not in proc.stdout
    assert "TokenZoomConfigError: tokenzoom.methods.ttm.prune_ratio = 1.5 is out of range" in proc.stderr
    assert "Loading safetensors" not in proc.stderr  # refused before the model loads


@pytest.fixture(scope="module")
def qwen2_text_model(tmp_path_factory, tiny_model):
    """A text-only Qwen2 checkpoint: an architecture tokenzoom does not support."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("models") / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=4096)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


def test_unsupported_architecture_is_refused(qwen2_text_model):
    proc = _llm_error(qwen2_text_model, {"tokenzoom": {}})
    assert proc.returncode != 0 and "ENGINE STARTED" not in proc.stdout
    assert "does not support model architecture(s) ['Qwen2ForCausalLM']" in proc.stderr
    assert "supported: LlavaOnevisionForConditionalGeneration" in proc.stderr


def test_dp_layer_beyond_the_model_is_refused(tiny_model):
    proc = _llm_error(tiny_model, {"tokenzoom": {"methods": {"dp": {"layer": 4}}}})
    assert proc.returncode != 0 and "ENGINE STARTED" not in proc.stdout
    assert "tokenzoom.methods.dp.layer = 4 is out of range for this model; allowed: 1 <= layer < 4" in proc.stderr


def test_dp_with_prefix_caching_is_refused(tiny_model):
    proc = _llm_error(tiny_model, {"tokenzoom": {}}, enable_prefix_caching=True)
    assert proc.returncode != 0 and "ENGINE STARTED" not in proc.stdout
    assert "cannot run with prefix caching" in proc.stderr


def test_unsupported_architecture_without_tokenzoom_still_serves(qwen2_text_model):
    proc = _llm_error(qwen2_text_model, {})
    assert "ENGINE STARTED" in proc.stdout, proc.stderr[-3000:]


def test_vllm_serve_exits_on_bad_config_before_the_engine_starts(tiny_model):
    bad = {"tokenzoom": {"methods": {"ttm": {"prune_ratio": 1.5}}}}
    proc = subprocess.run([vllm_cli(), "serve", *cpu_serve_args(tiny_model), "--plugin", "tokenzoom",
                           "--additional-config", json.dumps(bad), "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # argparse's status for a bad argument
    assert ("tokenzoom: error: tokenzoom.methods.ttm.prune_ratio = 1.5 is out of range; allowed: 0.0 <= "
            "prune_ratio < 1.0\n") in proc.stderr
    assert "Traceback" not in proc.stderr and "EngineCore" not in proc.stderr + proc.stdout


def test_vllm_serve_says_an_engine_refusal_in_one_line(tiny_model):
    """A refusal that needs the engine's config (here the model's layer count) is one line too."""
    bad = {"tokenzoom": {"methods": {"fastv": {"layer": 9}}}}
    proc = subprocess.run([vllm_cli(), "serve", *cpu_serve_args(tiny_model), "--plugin", "tokenzoom",
                           "--additional-config", json.dumps(bad), "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tokenzoom: error: tokenzoom.methods.fastv.layer = 9 is out of range for this model" in proc.stderr
    assert "Traceback" not in proc.stderr and "Loading safetensors" not in proc.stderr


@pytest.mark.parametrize("text,problem", [
    ("{bad", "is not valid JSON (Expecting property name enclosed in double quotes"),
    ('{"tokenzoom": {"preset": "ttm"', "is not valid JSON (Expecting ',' delimiter"),
    ('{"tokenzoom": {}', "is not valid JSON (Expecting ',' delimiter"),
    ("[1, 2]", "is not a JSON object"),
])
def test_malformed_additional_config_is_named_as_such(text, problem, capsys):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    with pytest.raises(SystemExit) as exit_:
        AsyncEngineArgs.from_cli_args(parser.parse_args(["m", "--plugin", "tokenzoom", "--additional-config", text]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"{text!r} {problem}" in err and "allowed: a JSON object" in err, err
    assert "tokenzoom: error: --additional-config" in err or "error: argument --additional-config" in err, err
    # without tokenzoom asked for, vLLM's own handling is untouched (tokenzoom's code does not run)
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["m", "--additional-config", "{bad"]))
    assert args.additional_config == "{bad"


def test_vllm_serve_refuses_an_unknown_plugin(tiny_model):
    proc = subprocess.run([vllm_cli(), "serve", tiny_model, "--plugin", "tokenzip"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "argument --plugin: invalid choice: 'tokenzip'" in proc.stderr and "tokenzoom" in proc.stderr


def test_cli_plugin_flag_is_sugar_for_additional_config(capsys):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())

    def engine_args(*argv):
        return AsyncEngineArgs.from_cli_args(parser.parse_args(["m", *argv]))

    assert engine_args("--plugin", "tokenzoom").additional_config == {"tokenzoom": {}}
    mine = {"tokenzoom": {"methods": {"ttm": {"prune_ratio": 0.5}}}, "other": 1}
    assert engine_args("--plugin", "tokenzoom", "--additional-config", json.dumps(mine)).additional_config == mine
    assert engine_args().additional_config in ({}, None)
    with pytest.raises(SystemExit) as exit_:  # on the command line: one line, argparse's status
        engine_args("--additional-config", json.dumps({"tokenzoom": {"methods": {"ttm": {"prune_ratio": 2}}}}))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("tokenzoom: error: tokenzoom.methods.ttm.prune_ratio = 2 is out of range")


def test_version_guard():
    from vllm_tokenzoom.version import check_vllm_version

    check_vllm_version("0.32.0+cpu")
    check_vllm_version("0.32.0")
    with pytest.raises(TokenZoomConfigError, match=r"needs vLLM 0\.32\.0.*found vLLM 0\.33\.1"):
        check_vllm_version("0.33.1")


def test_other_vllm_version_refuses_tokenzoom_and_leaves_vllm_alone(tiny_model):
    code = (
        "import sys, vllm\n"
        "vllm.__version__ = '0.33.1'  # pretend another release is installed\n"
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        "        LLM(model=sys.argv[1], dtype='float32', max_model_len=8192, enforce_eager=True,\n"
        "            additional_config={'tokenzoom': {}})\n"
        "    except Exception as e:\n"
        "        print('REFUSED', type(e).__name__, e)\n"
        "    from vllm import ModelRegistry\n"
        "    print('MODEL', ModelRegistry.models['LlavaOnevisionForConditionalGeneration'].class_name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, tiny_model], capture_output=True, text=True,
                          env={**__import__("os").environ, **ENV}, timeout=300)
    assert "REFUSED TokenZoomConfigError tokenzoom needs vLLM 0.32.0" in proc.stdout, proc.stderr[-3000:]
    assert "found vLLM 0.33.1" in proc.stdout
    assert "MODEL LlavaOnevisionForConditionalGeneration" in proc.stdout  # stock model class untouched


def _llm_attempts(model: str, attempts: list[tuple[dict, dict]]) -> list[str]:
    """Each (additional_config, LLM kwargs) in one child process; per attempt the refusal
    ("TokenZoomConfigError: ...") or "STARTED". Refusals come before the model loads, so one
    process can try many."""
    code = (
        "import json, sys\n"
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        "    for config, kwargs in json.loads(sys.argv[2]):\n"
        "        try:\n"
        "            llm = LLM(model=sys.argv[1], dtype='float32', max_model_len=4096, enforce_eager=True,\n"
        "                      additional_config=config, **kwargs)\n"
        "            print('ATTEMPT STARTED', llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill,\n"
        "                  llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens, flush=True)\n"
        "            del llm\n"
        "        except Exception as e:\n"
        "            print('ATTEMPT', type(e).__name__ + ':', str(e).replace(chr(10), ' '), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, model, json.dumps(attempts)], capture_output=True, text=True,
                          env={**__import__("os").environ, **ENV}, timeout=600)
    lines = [line[len("ATTEMPT "):] for line in proc.stdout.splitlines() if line.startswith("ATTEMPT ")]
    assert len(lines) == len(attempts), proc.stderr[-3000:]
    return lines


def test_prefill_methods_refuse_what_cannot_work_and_fit_what_can(tiny_model):
    """FastV needs each prompt prefilled in one step, prefix caching off, a KV cache its kernels
    can read, no speculative decoding or pipeline parallelism: each refusal names the setting."""
    fastv = {"tokenzoom": {"methods": {"fastv": {}}}}
    ttm = {"tokenzoom": {"preset": "ttm"}}
    lines = _llm_attempts(tiny_model, [
        (fastv, {"enable_chunked_prefill": True}),
        (fastv, {"max_num_batched_tokens": 2048}),
        (fastv, {"enable_prefix_caching": True}),
        (fastv, {"kv_cache_dtype": "fp8"}),
        (fastv, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}),
        (fastv, {"pipeline_parallel_size": 2}),
        (fastv, {"enable_dbo": True}),
        ({"tokenzoom": {"methods": {"fastv": {"layer": 4}}}}, {}),
        (ttm, {"enable_prefix_caching": True, "kv_cache_dtype": "fp8"}),  # TTM needs none of that
    ])
    assert lines[0].startswith("TokenZoomConfigError: tokenzoom method(s) 'fastv' need each video and the text after")
    assert "drop --enable-chunked-prefill" in lines[0]
    assert lines[1].startswith("TokenZoomConfigError:") and "--max-num-batched-tokens must be at least" in lines[1]
    assert "4096" in lines[1] and "2048" in lines[1]
    assert "cannot run with prefix caching" in lines[2] and "'ttm' preset" in lines[2]
    assert "--kv-cache-dtype 'fp8' cannot run with tokenzoom method(s) 'fastv'" in lines[3]
    assert "allowed: 'auto', 'bfloat16', 'float16', 'float32'" in lines[3]
    assert "speculative decoding (--speculative-config) cannot run with tokenzoom method(s) 'fastv'" in lines[4]
    assert "--pipeline-parallel-size 2 cannot run" in lines[5] and "allowed: 1" in lines[5]
    assert "--enable-dbo cannot run with tokenzoom method(s) 'fastv'" in lines[6] and "drop --enable-dbo" in lines[6]
    assert "tokenzoom.methods.fastv.layer = 4 is out of range for this model; allowed: 1 <= layer < 4" in lines[7]
    assert not lines[8].startswith("TokenZoomConfigError"), lines[8]  # TTM goes on to vLLM's own checks


def test_prefill_methods_turn_chunked_prefill_off(tiny_model):
    (line,) = _llm_attempts(tiny_model, [({"tokenzoom": {"methods": {"fastv": {}}}}, {})])
    assert line == "STARTED False 4096"  # chunked prefill off; every prompt up to max_model_len in one step


def test_vas_settings_and_engine_refusals_name_what_to_change(tiny_model, tiny_deep_model):
    """VAS's default end layer (last index - 4) does not fit a 4-layer model; with the 12-layer
    one, the one-step prefill it needs refuses chunked prefill and a --max-num-batched-tokens
    below --max-model-len, naming the setting (the cascade preset, which holds it, too)."""
    (line,) = _llm_attempts(tiny_model, [({"tokenzoom": {"preset": "vas"}}, {})])
    assert line.startswith("TokenZoomConfigError: tokenzoom.methods.vas.end_layer (unset: last layer index - 4 "
                           "= -1) = -1 is out of range for this model; allowed: start_layer + 2 = 4 <= end_layer <= 2")
    lines = _llm_attempts(tiny_deep_model, [
        ({"tokenzoom": {"preset": "cascade"}}, {"max_num_batched_tokens": 2048}),
        ({"tokenzoom": {"preset": "vas"}}, {"enable_chunked_prefill": True}),
        ({"tokenzoom": {"preset": "cascade"}}, {}),
    ])
    assert "tokenzoom method(s) 'vas' prefill each prompt in one step" in lines[0]
    assert "--max-num-batched-tokens must be at least --max-model-len" in lines[0]
    assert "tokenzoom method(s) 'vas' need each video and the text after it in one prefill step" in lines[1]
    assert "drop --enable-chunked-prefill" in lines[1]
    assert lines[2] == "STARTED False 4096"


def test_a_prompt_longer_than_one_prefill_step_is_refused_per_request(tiny_deep_model):
    """With VAS every prompt is one prefill step of at most --max-model-len tokens: a longer
    one (a 32-frame video at 2048) is refused as that request's error, naming max_model_len;
    the engine then serves the next request."""
    code = (
        "import sys\n"
        "from vllm import LLM, SamplingParams\n"
        "from vllm_tokenzoom.testing.video import chat_prompt, make_video\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(model=sys.argv[1], dtype='float32', max_model_len=2048, enforce_eager=True,\n"
        "              limit_mm_per_prompt={'image': 0, 'video': 1}, additional_config={'tokenzoom': {'preset': 'cascade'}})\n"
        "    prompt = chat_prompt(llm.get_tokenizer())\n"
        "    for frames in (32, 8):\n"
        "        try:\n"
        "            out = llm.generate([{'prompt': prompt, 'multi_modal_data': {'video': make_video(frames)}}],\n"
        "                               SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)\n"
        "            print('ATTEMPT TOKENS', len(out[0].outputs[0].token_ids), flush=True)\n"
        "        except Exception as e:\n"
        "            print('ATTEMPT', type(e).__name__ + ':', str(e).replace(chr(10), ' '), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, tiny_deep_model], capture_output=True, text=True,
                          env={**__import__("os").environ, **ENV}, timeout=600)
    lines = [line[len("ATTEMPT "):] for line in proc.stdout.splitlines() if line.startswith("ATTEMPT ")]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert lines[0].startswith("VLLMValidationError: The decoder prompt (length 3016) is longer than the maximum "
                               "model length of 2048. Make sure that `max_model_len`"), lines[0]
    assert lines[1] == "TOKENS 3"


def test_ata_refusals_name_what_to_change(tiny_model):
    """ATA decides from the token each step sampled: async scheduling is refused when asked for
    (and turned off otherwise); its default layer set (10-25) does not fit a 4-layer model."""
    ata = {"tokenzoom": {"methods": {"ata": {"first_score_layer": 1}}}}
    lines = _llm_attempts(tiny_model, [
        (ata, {"async_scheduling": True}),
        ({"tokenzoom": {"methods": {"ata": {}}}}, {}),
        (ata, {}),
    ])
    assert lines[0].startswith("TokenZoomConfigError: --async-scheduling cannot run with tokenzoom method(s) 'ata'")
    assert "drop --async-scheduling" in lines[0]
    assert ("tokenzoom.methods.ata.first_score_layer = 10 is out of range for this model; allowed: 0 <= "
            "first_score_layer <= last_score_layer < 4") in lines[1]
    assert lines[2].startswith("STARTED"), lines[2]


def test_voa_refusals_name_what_to_change(tiny_model):
    """VOA's probe decides from the step's sampled token (async scheduling refused), its second
    pass is built from the first's processed video (a processor cache the user asks for is
    refused; the default one is turned off), and its default layer set does not fit 4 layers."""
    voa = {"tokenzoom": {"methods": {"voa": {"first_score_layer": 1}}}}
    lines = _llm_attempts(tiny_model, [
        (voa, {"async_scheduling": True}),
        (voa, {"mm_processor_cache_gb": 2}),
        ({"tokenzoom": {"methods": {"voa": {}}}}, {}),
        (voa, {}),
    ])
    assert lines[0].startswith("TokenZoomConfigError: --async-scheduling cannot run with tokenzoom method(s) 'voa'")
    assert lines[1].startswith("TokenZoomConfigError: --mm-processor-cache-gb 2 cannot run with tokenzoom method(s) "
                               "'voa'") and "drop --mm-processor-cache-gb" in lines[1]
    assert "tokenzoom.methods.voa.first_score_layer = 10 is out of range for this model" in lines[2]
    assert lines[3].startswith("STARTED"), lines[3]


def _on_cuda(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)


def test_cuda_set_up_picks_the_backend_and_the_v1_runner_without_touching_the_environment(monkeypatch):
    """On CUDA (pretended here: the choice is made from the config alone) in-LLM methods get
    tokenzoom's backend and vLLM's V1 model runner; a plain engine keeps vLLM's choices; a user's
    other backend (flag or --attention-config) or VLLM_USE_V2_MODEL_RUNNER=1 is refused by name."""
    import os

    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_tokenzoom.config import parse_config
    from vllm_tokenzoom.engine import fit_engine_args
    from vllm_tokenzoom.engine import needs_v1_runner

    # made before CUDA is pretended: building EngineArgs loads the plugins, whose imports probe the platform
    args, flag, in_config, plain = (EngineArgs(model="m"), EngineArgs(model="m", attention_backend="FLASH_ATTN"),
                                    EngineArgs(model="m", attention_config={"backend": "FLASH_ATTN"}), EngineArgs(model="m"))
    _on_cuda(monkeypatch)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    dycoke = {"tokenzoom": {"preset": "dycoke"}}
    before = dict(os.environ)
    fit_engine_args(args, parse_config(dycoke))
    assert args.attention_backend == AttentionBackendEnum.CUSTOM
    assert dict(os.environ) == before
    assert needs_v1_runner(dycoke) and not needs_v1_runner({"tokenzoom": {"preset": "ttm"}}) and not needs_v1_runner({})

    class Engine:  # what the patched property reads of a VllmConfig
        additional_config = dycoke

    assert VllmConfig.use_v2_model_runner.fget(Engine()) is False

    with pytest.raises(TokenZoomConfigError, match="--attention-backend FLASH_ATTN cannot run with tokenzoom "
                                                   "method\\(s\\) 'dp'.*drop --attention-backend"):
        fit_engine_args(flag, parse_config(dycoke))
    with pytest.raises(TokenZoomConfigError, match="--attention-config.backend FLASH_ATTN cannot run"):
        fit_engine_args(in_config, parse_config(dycoke))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(TokenZoomConfigError, match="VLLM_USE_V2_MODEL_RUNNER=1 cannot run"):
        fit_engine_args(plain, parse_config(dycoke))


# VLLM_PLUGINS leaving tokenzoom out: vLLM loads none of the plugin, so the start-up hook
# (vllm_tokenzoom/plugin_guard.py, a .pth line in site-packages) must say it.
@pytest.mark.parametrize("plugins,argv", [
    ("lora_filesystem_resolver", ["--plugin", "tokenzoom"]),
    ("", ["--additional-config", '{"tokenzoom": {"preset": "ttm"}}']),
])
def test_vllm_serve_names_vllm_plugins_that_leave_tokenzoom_out(tiny_model, plugins, argv):
    proc = subprocess.run([vllm_cli(), "serve", *cpu_serve_args(tiny_model), *argv, "--port", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "VLLM_PLUGINS": plugins})
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "tokenzoom: error" in x]
    assert f"VLLM_PLUGINS={plugins!r} leaves the tokenzoom plugin out" in line
    assert f"allowed: add it (VLLM_PLUGINS={','.join(filter(None, [plugins, 'tokenzoom']))!r}) or unset" in line
    assert "Traceback" not in proc.stderr and "Loading safetensors" not in proc.stderr


_OFFLINE = """
import sys
from vllm import LLM
from vllm_tokenzoom.errors import TokenZoomConfigError
try:
    LLM(model=sys.argv[1], additional_config={"tokenzoom": {"preset": "dycoke"}}, max_model_len=4096)
except TokenZoomConfigError as e:
    print("REFUSED", e)
from vllm.engine.arg_utils import EngineArgs
EngineArgs(model=sys.argv[1], max_model_len=4096).create_engine_config()  # no tokenzoom: untouched
print("PLAIN OK")
"""


def test_offline_llm_names_vllm_plugins_that_leave_tokenzoom_out(tiny_model):
    proc = subprocess.run([sys.executable, "-c", _OFFLINE, tiny_model], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, plain = [x for x in proc.stdout.splitlines() if x.startswith(("REFUSED", "PLAIN"))]
    assert "a 'tokenzoom' key in --additional-config: VLLM_PLUGINS='lora_filesystem_resolver' leaves" in refused
    assert plain == "PLAIN OK"


def test_vllm_plugins_naming_tokenzoom_loads_it(tiny_model):
    """The hook stays out of the way: with tokenzoom named, the plugin's own checks answer."""
    bad = {"tokenzoom": {"preset": "nope"}}
    proc = subprocess.run([vllm_cli(), "serve", *cpu_serve_args(tiny_model), "--plugin", "tokenzoom",
                           "--additional-config", json.dumps(bad), "--port", "0"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VLLM_PLUGINS": "lora_filesystem_resolver,tokenzoom"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tokenzoom: error: tokenzoom.preset = 'nope'" in proc.stderr and "VLLM_PLUGINS" not in proc.stderr
