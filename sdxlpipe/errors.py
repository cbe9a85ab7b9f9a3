"""User-facing errors: what went wrong, where, and the fix.

`cli.py` turns a `UserError` into one `Error:` line plus a `Hint:` line and
exit code 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: bad config, missing file, wrong model."""

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint


class ConfigError(UserError):
    """Every problem found in a config file at once (one line each)."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        first_key, first_msg = problems[0]
        what = "; ".join(f"{key}: {msg}" for key, msg in problems)
        super().__init__(
            f"{path}: {what}",
            "fix the key(s) named above; `sdxlpipe init FOLDER` writes a commented example config",
        )
