"""Start-up hook: tokenzoom asked for while ``VLLM_PLUGINS`` leaves the plugin out.

Why: vLLM loads only the plugins ``VLLM_PLUGINS`` names (when it is set), so then no tokenzoom
code runs in any process: ``--plugin tokenzoom`` is an unknown argument and a ``tokenzoom`` key
in ``--additional-config`` (or ``LLM(additional_config=...)``) is silently ignored -- the server
runs uncompressed. The plugin itself cannot say so; this hook runs without it.
How: ``install/vllm_tokenzoom_plugin_guard.pth`` (at the site-packages root: in the wheel, and
copied by ``make install`` for an editable install) imports this module at interpreter start-up,
only when ``VLLM_PLUGINS`` is set (otherwise the line costs one environment lookup) and the
package is still there (an editable install removed leaves the copied line behind, harmless).
If it leaves tokenzoom out, a meta-path finder waits for ``vllm.engine.arg_utils`` and then
applies ``patches.apply_plugins_guard_only``; nothing else is imported. Otherwise it does nothing.
Remove when: vLLM refuses configuration keys of plugins it did not load.
"""
from __future__ import annotations

import os
import sys

ENTRY_POINT = "tokenzoom"  # the name of our vllm.general_plugins entry point (setup.py)
_TARGET = "vllm.engine.arg_utils"


def excluded(value: str | None) -> bool:
    """Whether ``VLLM_PLUGINS=value`` keeps vLLM from loading tokenzoom (vllm/envs.py splits it on ',')."""
    return value is not None and ENTRY_POINT not in value.split(",")


class _ArgUtilsFinder:
    """Applies the guard right after vLLM's ``arg_utils`` module is executed (once per process)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_guard(module):
            exec_module(module)
            from vllm_tokenzoom.patches import apply_plugins_guard_only

            apply_plugins_guard_only(os.environ["VLLM_PLUGINS"])

        spec.loader.exec_module = exec_then_guard
        return spec


def install() -> None:
    """Idempotent: watch for vLLM's engine arguments if ``VLLM_PLUGINS`` leaves tokenzoom out."""
    if excluded(os.environ.get("VLLM_PLUGINS")) and not any(isinstance(f, _ArgUtilsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ArgUtilsFinder())  # at start-up: vLLM is not imported yet


install()
