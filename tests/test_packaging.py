"""tokenzoom installs like a package: ``pip wheel .`` builds with build isolation (pyproject.toml
declares what the build needs), the wheel carries the C++ kernels for every CPU of its
architecture (none built for the build machine alone), and an install of it picks the build this
CPU runs at run time. Only numpy is required; what the demo, tests and pictures use are extras."""
import email
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # a copy of the tree: the build must not depend on (or write into) the working tree's build outputs
    src = out / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if name.startswith(("checkpoints/", "benchmarks/results/", "docs/")) or not (ROOT / name).is_file():
            continue
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=1200)  # build isolation: pip's default
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("vllm_tokenzoom-*.whl")
    return built


def test_wheel_builds_in_isolation_with_a_kernel_for_each_cpu_kind(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(n.split(".")[0] for n in names if n.startswith("vllm_tokenzoom/_C") and n.endswith(".so"))
    x86 = platform.machine() in ("x86_64", "AMD64")
    assert kernels == (["vllm_tokenzoom/_C_avx2", "vllm_tokenzoom/_C_avx512"] if x86 else ["vllm_tokenzoom/_C"])
    assert "vllm_tokenzoom/triton_kernels/indexed_attention.py" in names
    meta = email.message_from_string(zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    requires = meta.get_all("Requires-Dist")
    assert [r for r in requires if "extra ==" not in r] == ["numpy"]
    assert {"demo", "test", "tokenmap", "bench"} <= set(meta.get_all("Provides-Extra"))
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[vllm.general_plugins]" in entry and "tokenzoom = vllm_tokenzoom:register" in entry


def test_installed_wheel_picks_its_kernel_build_at_run_time(wheel, tmp_path):
    """Installed on its own (not the editable checkout), each build loads and reports the code
    path it compiled, and ``cpp_ops`` gives the one this CPU runs."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = (
        "import importlib, vllm_tokenzoom, vllm_tokenzoom.ops as ops\n"
        "assert vllm_tokenzoom.__file__.startswith(%r), vllm_tokenzoom.__file__\n"
        "print(ops.cpu_build(), ops.cpp_ops().__name__, ops.cpp_ops().simd_path())\n"
        "for name in ('_C_avx2', '_C_avx512', '_C'):\n"
        "    try:\n"
        "        print(name, importlib.import_module('vllm_tokenzoom.' + name).simd_path())\n"
        "    except ImportError:\n"
        "        pass\n"
    ) % str(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    from vllm_tokenzoom import ops

    picked = ops.cpu_build()
    assert lines[0] == f"{picked} vllm_tokenzoom.{picked} {'avx512' if picked == '_C_avx512' else 'portable'}"
    if platform.machine() in ("x86_64", "AMD64"):
        assert "_C_avx2 portable" in lines
        if picked == "_C_avx512":  # only an AVX-512 CPU can load the AVX-512 build
            assert "_C_avx512 avx512" in lines


def test_installed_wheel_guards_vllm_plugins_at_start_up(wheel, tmp_path):
    """The wheel's start-up line (site-packages root) arms the VLLM_PLUGINS guard when the variable
    leaves tokenzoom out; with it unset nothing of tokenzoom is imported, naming tokenzoom arms nothing."""
    names = zipfile.ZipFile(wheel).namelist()
    assert "vllm_tokenzoom_plugin_guard.pth" in names and "vllm_tokenzoom/plugin_guard.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import site, sys\n"
            "site.addsitedir(sys.argv[1])\n"  # as site.py treats site-packages: its .pth lines run
            "guard = sys.modules.get('vllm_tokenzoom.plugin_guard')\n"
            "print(guard is not None and guard.__file__.startswith(sys.argv[1]),\n"
            "      any(type(f).__name__ == '_ArgUtilsFinder' for f in sys.meta_path))\n")
    for plugins, expect in ((None, "False False"), ("tokenzoom", "True False"), ("other", "True True"),
                            ("", "True True"), ("other,tokenzoom", "True False")):
        env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
        if plugins is not None:
            env["VLLM_PLUGINS"] = plugins
        # -S: no site-packages of this venv (its own copy of the line), only the wheel's
        out = subprocess.run([sys.executable, "-S", "-c", code, str(target)], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() == expect, (plugins, out.stdout)
