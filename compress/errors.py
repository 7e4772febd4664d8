"""Errors a user can act on. The CLI prints these as one line (no traceback unless --debug)."""


class CompressError(Exception):
    """Base class: something the user asked for cannot be done; the message says what to change."""


class ConfigError(CompressError):
    """A recipe or pass config is invalid. Raised before any model is loaded."""


class UnsupportedModelError(CompressError):
    """The model's architecture is not in the adapter table and generic discovery failed."""
