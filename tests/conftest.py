"""Shared fixtures: the tiny LLaVA-OneVision checkpoint is built once per session (about 4 s).

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here,
before anything imports Triton (its JIT reads it when a kernel is decorated).
"""
from __future__ import annotations

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from vllm_tokenzoom.testing.tiny_model import build

    return str(build(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_deep_model(tmp_path_factory) -> str:
    """``tiny`` with 12 LM layers (methods acting across many layers: VAS)."""
    from vllm_tokenzoom.testing.tiny_model import build

    return str(build(tmp_path_factory.mktemp("models") / "tiny-deep", preset="tiny-deep", seed=0))


@pytest.fixture(scope="session")
def dense(tiny_model):
    """The HF-transformers reference model (no vLLM)."""
    from vllm_tokenzoom.reference.llava_onevision import DenseLlavaOnevision

    return DenseLlavaOnevision(tiny_model)


@pytest.fixture(scope="session")
def dense_deep(tiny_deep_model):
    """The HF-transformers reference of ``tiny-deep``."""
    from vllm_tokenzoom.reference.llava_onevision import DenseLlavaOnevision

    return DenseLlavaOnevision(tiny_deep_model)


@pytest.fixture(scope="session")
def prompt(dense) -> str:
    from vllm_tokenzoom.testing.video import chat_prompt

    return chat_prompt(dense.processor.tokenizer)
