"""Short messages for user errors: a bad config value, an unknown key, missing data, a bad checkpoint.

`train.py` prints `describe(err)` (a few lines: what is wrong, the value, what is valid, a close match)
instead of a traceback; `--debug` (or LMC_DEBUG=1) shows the traceback and the parser's full message.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

# Exceptions that carry a message written for the user (raised early by our checks, by Lightning's own
# configuration checks, or by a missing optional package); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ModuleNotFoundError,
    MisconfigurationException,
)
HINT = "(add --debug for the full traceback)"

_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)'")
_UNKNOWN_OPTION = re.compile(r"(?:Option|Key) '([\w.]+)' is not (?:accepted|expected)")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')
_NESTED_VALUE = re.compile(r"Given value: NestedArg\(key='([\w.]+)', val='(.*)'\)")
_EXPECTED = re.compile(r"Expected an? <class '([\w.]+)'>")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)")


def accepted_names(class_path: str) -> list[str]:
    """The init arguments (or dataclass fields) a class accepts; [] when it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def suggest(name: str, valid: list[str]) -> str:
    """'; did you mean X?' for a close match among valid, else ''."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


UNION_FAILED = "Does not validate against any of the Union subtypes"


def _outer_key(message: str) -> str:
    match = _PARSER_KEY.search(message)
    return match.group(1) if match else ""


def describe_parser_error(message: str, option_names: list[str] | None = None) -> str:
    """A few lines from jsonargparse's nested error report: the full key, the bad value, what is valid."""
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        lines = []
        for token in unrecognized.group(1).split():
            if token.startswith("--"):
                key = token[2:].split("=", 1)[0]
                valid = [o[2:] for o in option_names or [] if o.startswith("--")]
                lines.append(f"error: unknown option --{key}{suggest(key, valid)}")
        return "\n".join(lines) or f"error: {message.strip().splitlines()[0]}"

    outer = _outer_key(message)
    nested = _NESTED_VALUE.findall(message)
    full_key = f"{outer}.init_args.{nested[-1][0]}" if outer and nested else outer
    value = nested[-1][1] if nested else None
    unknown = _UNKNOWN_OPTION.findall(message)
    classes = _CLASS_PATH.findall(message)
    if unknown:
        name = unknown[-1].split(".")[-1]
        owner = classes[-1] if classes else ""
        valid = accepted_names(owner) if owner else []
        where = full_key.rsplit(".", 1)[0] if full_key.endswith(name) else full_key
        text = f"error: unknown key {name!r}" + (f" in {where}" if where else "")
        text += f" ({owner})" if owner else ""
        text += suggest(name, valid)
        if valid:
            text += "\n  valid keys: " + ", ".join(valid)
        return text
    expected = [t for t in _EXPECTED.findall(message) if t != "NoneType"]
    if full_key and expected:
        shown = f" = {value!r}" if value is not None else ""
        return f"error: {full_key}{shown}: expected {' or '.join(dict.fromkeys(expected))}"
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), message)
    leaves = [ln.strip(" -") for ln in message.splitlines() if ln.strip().startswith("- ")]
    # an optional class (a Union with None) lists "Expected a <class 'NoneType'>" beside the real reason
    leaves = [leaf for leaf in leaves if "NoneType" not in leaf]
    if UNION_FAILED in first and len(leaves) == 1:  # the class's own check: its message is the error
        return f"error: {leaves[0]}"
    lines = [f"error: {first}"] + [f"  {leaf}" for leaf in leaves[:3]]
    return "\n".join(lines)


def describe(err: BaseException) -> str:
    """The message of a user error, first line prefixed with 'error: ' (at most a few lines); a message
    already summarised that way (train.py's parser errors) is kept as it is, and jsonargparse's report of
    a class that refused its settings (a Union's every subtype, with the given value dumped) is summarised."""
    text = str(err).strip() or type(err).__name__
    if text.startswith(UNION_FAILED):
        return describe_parser_error(text)
    if isinstance(err, ModuleNotFoundError) and err.name:
        text = f"the optional package {err.name!r} is not installed ({text})"
    return text if text.startswith("error: ") else f"error: {text}"


def first_user_error(err: BaseException) -> BaseException | None:
    """err or the first exception in its cause / context chain that is a user error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, USER_ERRORS):
            return current
        current = current.__cause__ or current.__context__
    return None


def run_reporting_user_errors(action: Callable[[], Any], debug: bool = False) -> tuple[bool, Any]:
    """(True, action()) or, on a user error, print its short message and the --debug hint and return
    (False, None); with debug (or LMC_DEBUG=1) the error propagates with its traceback. The commands
    (export, generate, evaluate) share this with train.py's main."""
    debug = debug or os.environ.get("LMC_DEBUG", "") not in ("", "0")
    try:
        return True, action()
    except Exception as err:  # noqa: BLE001 - only user errors are summarised; the rest re-raise
        user_error = first_user_error(err)
        if debug or user_error is None:
            raise
        print(f"{describe(user_error)}\n{HINT}", file=sys.stderr)
        return False, None
