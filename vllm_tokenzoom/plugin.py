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

    On a vLLM version other than the supported one only the version guard is installed:
    an installed tokenzoom never breaks vLLM, and asking for tokenzoom there fails with
    a clear error.
    """
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_tokenzoom import patches
    from vllm_tokenzoom.version import SUPPORTED_VLLM, installed_vllm_version

    version = installed_vllm_version()
    if version.split("+")[0] != SUPPORTED_VLLM:
        logger.warning("tokenzoom supports vLLM %s only; found %s: tokenzoom stays off", SUPPORTED_VLLM, version)
        patches.apply_version_guard_only()
        return
    patches.apply_all()
    logger.info("tokenzoom %s registered (pid %d)", __version__, os.getpid())
