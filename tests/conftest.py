"""Shared fixtures: the tiny LLaVA-OneVision checkpoint is built once per session (about 4 s)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from vllm_tokenzoom.testing.tiny_model import build

    return str(build(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0))


@pytest.fixture(scope="session")
def dense(tiny_model):
    """The HF-transformers reference model (no vLLM)."""
    from vllm_tokenzoom.reference.llava_onevision import DenseLlavaOnevision

    return DenseLlavaOnevision(tiny_model)


@pytest.fixture(scope="session")
def prompt(dense) -> str:
    from vllm_tokenzoom.testing.video import chat_prompt

    return chat_prompt(dense.processor.tokenizer)
