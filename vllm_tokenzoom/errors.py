"""The one error users see for bad tokenzoom input."""


class TokenZoomConfigError(ValueError):
    """A tokenzoom setting is wrong: the message names the key, the value and what is allowed."""
