"""How much work one command takes on, and the checks on the files it reads and writes, made before any work starts.

Every limit has a default, chosen so that what a command accepts fits in a few GB of memory and minutes of time,
and is raised (or lowered) with `--limit NAME=VALUE` on the commands that use it. A request beyond a limit is one
`error:` line naming the limit and that flag.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DoolyError

CEILING = 2**31  # highest value a limit takes: sums of limited values stay far inside int64


@dataclass(frozen=True)
class Limit:
    name: str
    default: int
    bounds: str


LIMITS = {limit.name: limit for limit in (
    Limit("tokens-per-step", 2**20, "new tokens in one step (a predicted batch; simulate's --max-batch-tokens)"),
    Limit("requests-per-step", 2**16, "requests in one step (a predicted batch; simulate's --max-requests)"),
    Limit("context-tokens", 2**24, "keys one request attends to in a predicted step: its past plus new tokens"),
    Limit("requests", 10**6, "requests in a workload (a trace, a synthetic n) or in all steps of a batch file"),
    Limit("prompt-tokens", 2**20, "prompt tokens of one simulated request"),
    Limit("output-tokens", 2**20, "output tokens of one simulated request"),
    Limit("workload-tokens", 2**26, "prompt plus output tokens of all requests of a simulated workload"),
    Limit("steps", 2**22, "steps of one simulation"),
)}


class Limits:
    """The limits a command runs under: the defaults, with the values given to `--limit`."""

    def __init__(self, values: dict[str, int] | None = None):
        self.values = {name: limit.default for name, limit in LIMITS.items()} | (values or {})

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def check(self, name: str, value: float, what: str) -> None:
        """Refuse `value` (of `what`, e.g. "batch 'decode:9@1': requests in one step") beyond the limit `name`."""
        if value > self.values[name]:
            raise DoolyError(f"{what}: {_number(value)}, over the {name} limit of {self.values[name]:,} "
                             f"(raise it with --limit {name}=N)")


def _number(value: float) -> str:
    if isinstance(value, float):  # a drawn length
        return f"{value:,.0f}" if math.isfinite(value) else "beyond any number"
    digits = len(str(value))
    return f"{value:,}" if digits <= 24 else f"a number of {digits} digits"


def add_limit_argument(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    rows = "; ".join(f"{name} ({LIMITS[name].default:,}): {LIMITS[name].bounds}" for name in names)
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help=f"raise (or lower) a limit, repeatable: {rows}")


def parse_limits(given: list[str], names: Iterable[str]) -> Limits:
    """`--limit` values (`NAME=VALUE`), for a command that uses the limits `names`."""
    names = list(names)
    values = {}
    for item in given:
        name, _, value = item.partition("=")
        if name not in names:
            raise DoolyError(f"--limit {item}: unknown limit {name!r} here (choose from {', '.join(names)})")
        if not (value.isascii() and value.isdigit() and len(value) <= 10 and 1 <= int(value) <= CEILING):
            raise DoolyError(f"--limit {item}: expected {name}=N with N an integer from 1 to {CEILING:,}")
        values[name] = int(value)
    return Limits(values)


def read_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, read a line at a time."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except OSError as e:
        raise DoolyError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DoolyError(f"{path}: the {what} is not UTF-8 text") from None


def read_text(path: Path, what: str) -> str:
    return "".join(line for _, line in read_lines(path, what))


def parse_json(text: str, where: str):
    """JSON, or one error line: malformed, nested too deep, or holding an integer of more digits than Python reads."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise DoolyError(f"{where} is not JSON") from None


def output_file(path: Path, flag: str) -> Path:
    """A file a command writes, such as a store it creates when missing: not a folder, and in a folder that exists."""
    if path.is_dir():
        raise DoolyError(f"{flag} {path}: a folder, not a file")
    parent = path.absolute().parent
    if not path.exists() and not parent.is_dir():
        raise DoolyError(f"{flag} {path}: its parent folder {parent} does not exist")
    return path


def output_folder(path: Path, flag: str) -> Path:
    """A folder a command will write into: it may not exist yet, but its parent must."""
    if path.exists():
        if not path.is_dir():
            raise DoolyError(f"{flag} {path}: not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DoolyError(f"{flag} {path}: the folder is not writable")
        return path
    parent = path.absolute().parent
    if not parent.is_dir():
        raise DoolyError(f"{flag} {path}: its parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DoolyError(f"{flag} {path}: cannot create it in {parent} (not writable)")
    return path
