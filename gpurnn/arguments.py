"""Argument parsing shared by every `python -m gpurnn` command (and the `python -m` entry
points of its parts): a user's mistake ends in one line that says what was wrong and what
is accepted, with exit status 2, never a traceback; help shows every default.

Names (backends, implementations, dtypes, modes, devices) are matched case-insensitively:
`--backends Triton` means `triton`. The value parsers below run while the command line is
parsed, so a wrong name stops the command before it loads or compiles anything.

Imports only the standard library and torch: every command module may import it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable


class UsageError(ValueError):
    """A user's mistake found after parsing (e.g. an option that needs another one): the
    command line prints its message as one line and exits with status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default, unless its help already says it (an option
    without one says "none"; an on/off flag is off); descriptions keep their line breaks."""

    def _get_help_string(self, action):
        help = action.help or ""
        if not action.option_strings or action.nargs == 0 or "default" in help:
            return help
        if action.default is None or action.default == "":
            return help + " (default: none)"
        return help + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2 (argparse's
    own status for a usage error), without the usage block; its subcommands' parsers are
    of the same kind."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def usage_error(prog: str, error: UsageError) -> int:
    """Prints a UsageError the way the parser prints its own; returns the exit status."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def names(choices: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """A parser of a comma-separated list of `choices` (any case; returned as spelled in
    `choices`, without repeats); anything else is refused with the accepted names."""
    by_lower = {c.lower(): c for c in choices}

    def parse(text: str) -> list[str]:
        given = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in given if t.lower() not in by_lower]
        if unknown or not given:
            wrong = f"unknown {what} {', '.join(map(repr, unknown))}" if unknown else f"no {what}"
            raise argparse.ArgumentTypeError(f"{wrong}; choose from {', '.join(by_lower.values())}")
        return list(dict.fromkeys(by_lower[t.lower()] for t in given))

    parse.__name__ = what  # argparse names the type in some of its messages
    return parse


def device(text: str):
    """`cpu`, `cuda` or `cuda:N` as a torch.device, refused unless it exists here."""
    import torch

    name = text.strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose from cpu, cuda, cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise argparse.ArgumentTypeError(
                f"{text!r}: no CUDA device here (torch {torch.__version__}, {build}); choose cpu"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return torch.device(name)


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def run_command(prog: str, description: str | None, add_arguments, run, argv=None) -> int:
    """A command's `main`: parse `argv` with `add_arguments`, then `run(args)`; a
    UsageError from `run` is printed as one line, exit status 2."""
    parser = Parser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        return usage_error(prog, e)
