"""The one exception type users see as a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a refused action; the CLI prints `error: <message>` and exits with 2.

    Messages name the file, the line or key, and what was expected.
    """
