"""Errors a user can cause. The CLI prints them and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: config, corpus, paths or shards.

    The message says what was given and what is allowed. Instances pickle
    cleanly (submitit ships a job's exception back to the submitter), so the
    only constructor argument is the message (or the list of problems).
    """

    def __init__(self, message: str | list[str]) -> None:
        problems = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(problems))
        self.problems = problems

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:
        return (type(self), (self.problems,))


class ConfigError(UserError):
    """One or more problems in a job configuration, each naming its dotted key."""
