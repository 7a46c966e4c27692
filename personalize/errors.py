"""Errors a user can act on. The CLI prints them as one line and exits non-zero, never with a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

M = TypeVar("M")


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


def load_yaml_model(path: Path, model: type[M], missing: str) -> M:
    """A YAML file validated as a pydantic ``model``: a missing file is ``missing``, bad YAML or a bad field one
    :class:`ConfigError` naming the file and the field."""
    import yaml
    from pydantic import ValidationError

    try:
        raw: Any = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line for a one-line error: its message's first line (at most ``limit`` characters), or
    its type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def option_error(exc: ValueError, options: dict[str, str] | None = None) -> PersonalizeError:
    """A config's refusal of a command-line value as one line naming the option and the value: pydantic's own text
    ends in a link (``For further information visit ...``) and starts with the class's name. ``options`` maps a field
    to its option where they differ (``{"horizon_days": "--horizon"}``); by default ``--field-name``."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return PersonalizeError(first_line(exc))
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    fields = [str(p) for p in error["loc"] if not isinstance(p, int)]
    if not fields:  # a check across fields names them itself
        return PersonalizeError(message)
    option = (options or {}).get(fields[-1], "--" + fields[-1].replace("_", "-"))
    given = error.get("input")
    value = f" {given!r}" if isinstance(given, (str, int, float)) and not isinstance(given, bool) else ""
    return PersonalizeError(f"{option}{value}: {message[0].lower()}{message[1:]}")
