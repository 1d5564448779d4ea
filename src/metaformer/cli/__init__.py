"""The ``metaformer`` command line: validate, train, validate-seg, train-seg, predict, benchmark, info and list.

Every command is a module with ``add_parser(subparsers)`` and ``run(args) -> int``. A user's mistake
(a missing folder, an unreadable image, weights for another model, an unknown flag or model) ends
with one line on stderr, ``metaformer: error: ...``, and exit status 2; set ``METAFORMER_DEBUG=1`` to
see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "CLIError"]

from .options import CLIError

COMMANDS = ("validate", "train", "validate-seg", "train-seg", "predict", "benchmark", "info", "list")
EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``metaformer: error: <command>: <message>``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        command = self.prog.split()[-1] if " " in self.prog else ""
        prefix = f"{command}: " if command and command != "metaformer" else ""
        self.exit(EXIT_ERROR, f"metaformer: error: {prefix}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``metaformer`` command with all its sub-commands."""
    from .. import __version__
    from . import benchmark, info, predict, train, train_seg, validate, validate_seg

    parser = _Parser(prog="metaformer", description="PoolFormer / MetaFormer models: evaluate, train, "
                     "predict, benchmark and inspect.",
                     epilog="Run `metaformer COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"metaformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in (validate, train, validate_seg, train_seg, predict, benchmark):
        module.add_parser(sub)
    info.add_parsers(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The message of an exception as one line.

    DataLoader workers re-raise with the worker's traceback in the message: keep its last line.
    """
    text = str(exc).strip()
    if "Original Traceback" in text or "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1].strip()
        head, sep, rest = text.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum() and head[:1].isupper():
            text = rest  # drop "OSError: "
    if isinstance(exc, KeyError) and text.startswith("'"):
        text = text.strip("'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def _user_errors() -> tuple:
    from ..hub import PretrainedError
    from ..weights import CheckpointError

    return (CLIError, ValueError, TypeError, CheckpointError, PretrainedError, FileNotFoundError,
            IsADirectoryError, NotADirectoryError, PermissionError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a user's mistake (reported on stderr as one line).
    """
    from ..files import WriteError
    from ..hub import PretrainedError

    argv: list[str] = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("METAFORMER_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        detail = str(e)
        print(f"metaformer: interrupted{': ' + detail if detail else ''}", file=sys.stderr, flush=True)
        return 130
    except WriteError as e:  # a full disk, no permission: not the user's mistake, but one line says it all
        if debug:
            raise
        print(f"metaformer: error: {e.strerror or e}", file=sys.stderr, flush=True)
        return 1
    except _user_errors() as e:
        if debug:
            raise
        text = _one_line(e)
        if isinstance(e, PretrainedError):
            from .hub_access import reword

            text = reword(text)
        print(f"metaformer: error: {text}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except SystemExit as e:  # argparse --help / errors, already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    except RuntimeError as e:
        # Failures inside torch (out of memory, a worker killed...) are not the user's mistake but are
        # still best reported in one line; the traceback is one env variable away.
        if debug:
            raise
        print(f"metaformer: error: {type(e).__name__}: {_one_line(e)} (METAFORMER_DEBUG=1 shows the traceback)",
              file=sys.stderr, flush=True)
        return 1
