"""What ``vllm_tokenzoom.register()`` does in each vLLM process."""
from __future__ import annotations

import logging
import os

from vllm_tokenzoom import __version__

# a child of vLLM's logger, so lines carry its format and process prefix
logger = logging.getLogger("vllm.tokenzoom")
_registered = False


def register() -> None:
    """Lazy, idempotent, safe in every process.

    On a vLLM version other than the supported one, nothing is patched (an installed
    tokenzoom must never break vLLM); enabling tokenzoom there fails with a clear error
    (the version check in ``create_engine_config`` still runs, through
    :func:`_install_version_guard_only`).
    """
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_tokenzoom.version import SUPPORTED_VLLM, installed_vllm_version

    version = installed_vllm_version()
    if version.split("+")[0] != SUPPORTED_VLLM:
        logger.warning("tokenzoom supports vLLM %s only; found %s: tokenzoom stays off", SUPPORTED_VLLM, version)
        _install_version_guard_only()
        return
    from vllm_tokenzoom.patches import apply_all

    apply_all()
    logger.info("tokenzoom %s registered (pid %d)", __version__, os.getpid())


def _install_version_guard_only() -> None:
    """On an unsupported vLLM, asking for tokenzoom raises the version error instead of being ignored."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:  # an unknown vLLM layout: leave it alone
        return
    orig_create = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        if "tokenzoom" in (self.additional_config or {}):
            from vllm_tokenzoom.version import check_vllm_version

            check_vllm_version()
        return orig_create(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
