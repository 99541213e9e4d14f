"""Errors a user can act on. Entry points turn them into a message and exit code 2."""


class UserError(Exception):
    """Bad input or configuration: the message names the key, file or row to fix."""


class ConfigError(UserError):
    """One or more configuration errors, all reported at once."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} configuration error(s):\n{lines}")
