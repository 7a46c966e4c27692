"""Errors a user can act on. The CLI prints them as one line and exits non-zero, never with a traceback."""

from __future__ import annotations


class PersonalizeError(Exception):
    """Base class: the message is the whole story, written for the person at the terminal."""


class ConfigError(PersonalizeError):
    """A configuration file or option is invalid."""


class DataFileError(PersonalizeError):
    """An input file cannot be read as the configured table: missing, empty, wrong encoding or wrong columns."""

    def __init__(self, path: object, problem: str, column: str | None = None) -> None:
        self.path = str(path)
        self.column = column
        where = f"{self.path}" + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {problem}")


class ContractError(PersonalizeError):
    """A frame breaks its declared contract where quarantining rows is not an option (e.g. a built frame)."""
