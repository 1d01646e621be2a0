"""tokenzoom: a vLLM plugin that compresses video tokens inside vLLM's paged KV cache."""
__version__ = "0.1.0"


def register() -> None:
    """vLLM's general-plugin entry point, called once in every vLLM process."""
    from vllm_tokenzoom.plugin import register as _register

    _register()
