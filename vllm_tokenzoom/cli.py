"""How tokenzoom's configuration reads on the command line (``vllm serve``, ``vllm bench``):
used by the ``EngineArgs`` patches of ``patches.py``."""
from __future__ import annotations

import argparse
import contextlib
import sys


@contextlib.contextmanager
def one_line_refusal(on_cli: bool):
    """A configuration mistake made on the command line (``vllm serve``, ``vllm bench``) is one
    line on stderr and exit status 2, as argparse says a bad argument; no traceback. Offline
    (``LLM(...)``) the :class:`TokenZoomConfigError` propagates to the caller."""
    from vllm_tokenzoom.errors import TokenZoomConfigError

    try:
        yield
    except TokenZoomConfigError as e:
        if not on_cli:
            raise
        print(f"tokenzoom: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def json_named(parse):
    """``--additional-config``'s argparse type: a text that mentions tokenzoom and is not JSON is
    refused saying where the JSON breaks (vLLM says only "cannot be converted to <function loads>")."""
    def additional_config(text: str):
        if "tokenzoom" in text:
            import json

            try:
                json.loads(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e}); allowed: a JSON object, "
                                                  "e.g. '{\"tokenzoom\": {\"preset\": \"ttm\"}}'") from None
        return parse(text)

    return additional_config


def check_json(additional_config, plugin: bool) -> None:
    """vLLM keeps an ``--additional-config`` that is not JSON as a string (and later fails on it
    in its config validation); with tokenzoom asked for, it is named as what it is."""
    if not isinstance(additional_config, str) or not (plugin or "tokenzoom" in additional_config):
        return
    import json

    from vllm_tokenzoom.errors import TokenZoomConfigError

    try:
        json.loads(additional_config)
        problem = "is not a JSON object"
    except ValueError as e:
        problem = f"is not valid JSON ({e})"
    raise TokenZoomConfigError(f"--additional-config {additional_config!r} {problem}; allowed: a JSON object, "
                               "e.g. '{\"tokenzoom\": {\"preset\": \"ttm\"}}'")
