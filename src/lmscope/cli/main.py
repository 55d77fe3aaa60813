"""``lmscope`` command line: one module per verb in this package, each with ``add_parser(sub)``.

Errors meant for users (``LmscopeError``) print one line on stderr and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading

# verb modules, in the order --help lists them; a new verb is one module + one name here
VERBS = [
    "inspect",
    "models",
    "demo",
    "explain",
    "patch",
    "heads",
    "dla",
    "scan",
    "features",
    "audit",
    "compress",
    "search",
    "evaluate",
    "compare",
    "serve",
]


def build_parser() -> argparse.ArgumentParser:
    from .common import Parser

    parser = Parser(
        prog="lmscope",
        description="Open a language model offline, see what it computes, explain it, compress it.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"lmscope {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        try:
            module = importlib.import_module(f"lmscope.cli.{verb}")
        except ModuleNotFoundError as e:
            if e.name == f"lmscope.cli.{verb}":
                continue  # verb not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import signal

    from ..fsutil import INTERRUPTED

    def on_sigint(signum, frame):
        INTERRUPTED.set()  # remembered even if a library catches the KeyboardInterrupt below
        raise KeyboardInterrupt

    INTERRUPTED.clear()
    previous = signal.getsignal(signal.SIGINT)
    ours = previous is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    if ours:  # not when Ctrl-C is ignored (nohup) or handled by a host program
        signal.signal(signal.SIGINT, on_sigint)
    try:
        code = _main(argv)
        if INTERRUPTED.is_set():  # swallowed on the way, but nothing was moved into place after it
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:  # anywhere, imports included: one line, no traceback
        print("lmscope: interrupted", file=sys.stderr)
        return 130
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .common import EarlyExit

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except EarlyExit as e:
        return e.code
    except SystemExit as e:  # a usage error (one line, see common.Parser); --help / --version exit 0
        if not e.code:
            raise
        return int(e.code)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..errors import LmscopeError
    from ..models.lean import lean_transformers
    from .common import LOAD_OPTIONS

    lean_transformers()  # the CLI's own process only: a library user's transformers is left as it is

    LOAD_OPTIONS.update(dtype=getattr(args, "dtype", None), device=getattr(args, "device", None))
    try:
        result = args.func(args)
    except LmscopeError as e:
        print(f"lmscope: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
