"""Exceptions shared across the package."""


class GrenError(Exception):
    """Base class for errors that carry a message meant for the user (shown without a traceback)."""


class DataError(GrenError):
    """Bad input data: a malformed CSV row, an unreadable image, an inconsistent dataset folder.

    The message names the file (and line, for tables) and what was expected.
    """


class ImageReadError(DataError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported)."""
