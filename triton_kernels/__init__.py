"""Triton kernels, installed as ``vllm_tokenzoom.triton_kernels`` (never as a top-level
``triton_kernels``: vLLM imports the triton-lang package of that name for MXFP4 models)."""
