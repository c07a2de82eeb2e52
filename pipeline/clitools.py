"""What every command line of the project shares: help that shows defaults, ``--version``,
``--debug``, and errors reported as one ``error:`` line with exit code 2.

A command builds its parser with :func:`parser` and runs its body through :func:`run`, which turns
the errors a user can act on (a bad config, a missing file, a bad value) into ``error: <message>``
(exit 2) and any other exception into ``error: <type>: <message>`` (exit 1); the traceback is
printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from typing import Callable

# Exceptions whose message is written for the user: the project raises these with the file and
# the problem in the text (ConfigError derives from ValueError).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("opendialog-forge")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" to every help text that has
    a default worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser(prog: str | None, description: str, **kwargs) -> argparse.ArgumentParser:
    """``prog`` None: the name the program was started as (a script or an entry point)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter, **kwargs)
    add_common(p)
    return p


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s (opendialog-forge) {version()}",
                   help="print the version and exit")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback when the command fails")


def subparsers(p: argparse.ArgumentParser, **kwargs):
    """Subcommands with the same help formatting as their parent."""
    sub = p.add_subparsers(**kwargs)
    orig = sub.add_parser

    def add_parser(name, **kw):
        kw.setdefault("formatter_class", _Formatter)
        return orig(name, **kw)

    sub.add_parser = add_parser
    return sub


def report_error(e: BaseException, debug: bool, user_errors: tuple = ()) -> int:
    if debug:
        traceback.print_exc()
    if _disk_full(e):
        # Ray re-raises a worker's OSError as its own type around the original: find the file there.
        where = getattr(e, "filename", None) or getattr(getattr(e, "cause", None), "filename", None)
        print(f"error: no space left on device{f' writing {where}' if where else ''}: free space "
              "(or use another --output) and run again; finished work is kept and resumes", file=sys.stderr)
        return 2
    if isinstance(e, USER_ERRORS + tuple(user_errors)):
        print(f"error: {e}", file=sys.stderr)
        return 2
    hint = "" if debug else " (run again with --debug for the traceback)"
    print(f"error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
    return 1


def _disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return False


def run(body: Callable[[], int | None], debug: bool, user_errors: tuple = ()) -> int:
    """Run a command's body; map exceptions to one ``error:`` line and an exit code.
    ``user_errors``: further exception types whose message is meant for the user (exit 2)."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
        return report_error(e, debug, user_errors)
