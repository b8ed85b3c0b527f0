"""User-facing errors: one line, names the file and the problem, no traceback."""

from __future__ import annotations


def printable(text: str) -> str:
    """A file name as one printable line: control characters and undecodable bytes escaped."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in out)


class BreastcadError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``str(err)`` on one line and exits non-zero; it never shows a
    traceback for these.
    """


class ImageReadError(BreastcadError):
    """A file that should be an image could not be decoded."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{printable(path)}: {problem}")


class DataError(BreastcadError):
    """A dataset (folder or manifest) is unusable as a whole."""


class ConfigError(BreastcadError):
    """A configuration key or value is invalid."""
