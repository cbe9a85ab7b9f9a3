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

    def __init__(self, path: str, problems: list[tuple[str, str]], from_set: dict[str, str | None] | None = None) -> None:
        self.path = path
        self.problems = problems
        # A problem whose value came from `--set key=value` is blamed on that, not on the file.
        from_set = from_set or {}
        in_file = [(k, m) for k, m in problems if not from_set.get(k)]
        parts = [f"--set {from_set[k]}: {m}" for k, m in problems if from_set.get(k)]
        if in_file:
            parts.insert(0, f"{path}: " + "; ".join(f"{key}: {msg}" for key, msg in in_file))
        if not in_file:
            hint = "fix the --set value(s) named above: --set section.key=value, the value written as in TOML"
        elif len(in_file) < len(problems):
            hint = f"fix the key(s) named above in {path} and the --set value(s)"
        else:
            hint = "fix the key(s) named above; `sdxlpipe init FOLDER` writes a commented example config"
        super().__init__("; ".join(parts), hint)
