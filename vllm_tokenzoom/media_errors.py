"""The answer a client gets for a media URL vLLM could not fetch (``patches._patch_media_errors``)."""
from __future__ import annotations


def media_error(url: str, error: Exception) -> Exception:
    """The error a client gets for a media URL that could not be fetched (``error`` itself when
    it is not one of the cases ``_patch_media_errors`` names)."""
    import asyncio
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError, VLLMValidationError

    shown = url if len(url) <= 200 else url[:200] + "..."
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return VLLMValidationError(f"media URL {shown!r}: no such file", parameter="url")
    if isinstance(error, IsADirectoryError):
        return VLLMValidationError(f"media URL {shown!r} is a directory, not a file", parameter="url")
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return GracefulHTTPError(f"media URL {shown!r}: the host did not answer in time", HTTPStatus.GATEWAY_TIMEOUT)
    cause = connection_failure(error)
    if cause is not None:
        return VLLMValidationError(f"media URL {shown!r} cannot be fetched: {cause}", parameter="url")
    return error


def connection_failure(error: Exception) -> str | None:
    import socket

    try:
        import aiohttp

        if isinstance(error, aiohttp.ClientConnectorDNSError):
            return "its host name cannot be resolved"
        if isinstance(error, aiohttp.ClientConnectorError):
            return f"the connection failed ({error.os_error.strerror or error.os_error})"
    except ImportError:
        pass
    try:
        import requests

        if isinstance(error, requests.exceptions.ConnectionError):
            text = str(error)
            return "its host name cannot be resolved" if ("resolve" in text or "Name or service" in text) \
                else "the connection failed"
    except ImportError:
        pass
    if isinstance(error, socket.gaierror):
        return "its host name cannot be resolved"
    if isinstance(error, ConnectionError):
        return f"the connection failed ({error})"
    return None
