"""Shared CLI plumbing: reading text, opening models, and writing --out atomically."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..errors import LmscopeError
from ..fsutil import atomic_directory


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with lmscope's error shape: one stderr line "problem — fix", exit 2 (no usage block)."""

    def error(self, message: str):
        prefix = "the following arguments are required: "
        if message.startswith(prefix):
            names = message[len(prefix) :]
            message = f"{names} {'is' if ',' not in names else 'are'} required"
        self.exit(2, f"lmscope: error: {message} — see '{self.prog} --help'\n")


class EarlyExit(Exception):  # noqa: N818  (not an error: an option that finished the command while parsing)
    """Raised by options that do their whole job while parsing (``explain --methods list``)."""

    def __init__(self, code: int = 0):
        super().__init__(code)
        self.code = code


def add_verb(sub, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    """Add a verb whose --help ends with an example."""
    p = sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}", formatter_class=HelpFormatter
    )
    p.set_defaults(func=func)
    return p


#: --dtype / --device of the running command, applied by load_model (set by main() after parsing)
LOAD_OPTIONS: dict = {}


def add_model_arg(p: argparse.ArgumentParser, default: str = "smollm2", multiple: bool = False) -> None:
    p.add_argument(
        "--model",
        default=None if multiple else default,
        action="append" if multiple else "store",
        help="built-in name (smollm2, minilm), a HF directory, a .gguf file or a hub id"
        + (" (repeatable)" if multiple else f" (default: {default})"),
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weights and compute dtype (default: float32)",
    )
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or mps")


def add_text_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--text", help="the input text")
    g.add_argument("--text-file", help="read the input text from a UTF-8 file")
    p.add_argument("--truncate", action="store_true", help="cut text longer than the model's context")


def read_text_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise LmscopeError(f"text file '{path}' does not exist", "check the path given to --text-file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmscopeError(
            f"'{path}' is not UTF-8 text (bad byte at offset {e.start})",
            "save it as UTF-8 (e.g. iconv -t utf-8) and try again",
        ) from None


def get_text(args) -> str:
    text = read_text_file(args.text_file) if getattr(args, "text_file", None) else args.text
    if text is None or not text.strip():
        raise LmscopeError("the text is empty", "pass some text with --text or --text-file")
    return text


def load_model(spec: str):
    import lmscope

    return lmscope.load(spec, **LOAD_OPTIONS)


def check_out_dir(out: str) -> Path:
    """Fail early (before any heavy work) when --out cannot be written: it is a file, lies under a file,
    or its nearest existing folder refuses a new entry (read-only, /proc, /sys). Probed by creating and
    removing an empty folder there, which is what ``atomic_out`` will do; ``os.access`` cannot tell."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise LmscopeError(f"--out '{out}' exists and is not a directory", "choose another --out directory")
    nearest = path
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise LmscopeError(
            f"--out '{out}' lies under '{nearest}', which is a file", "choose an --out path under a folder"
        )
    probe_in = nearest
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lmscope-probe-", dir=probe_in))
    except OSError as e:
        raise LmscopeError(
            f"--out '{out}' cannot be created in '{probe_in}' ({e.strerror.lower()})",
            "choose a directory you can write to",
        ) from None
    return path


def show_path(out: str, name: str = "") -> str:
    """``out`` joined with ``name`` for messages, without doubled slashes ("small/" + "x" -> "small/x")."""
    base = out.rstrip("/")
    if not name:
        return base or "/"
    return f"{base}/{name}"


def atomic_out(out: str):
    """Yield a temporary directory; on success its files move into ``out``. On error nothing is written."""
    return atomic_directory(check_out_dir(out))


def parse_int_list(value: str | None, name: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise LmscopeError(
            f"{name} must be comma-separated integers, got '{value}'", f"e.g. {name} 0,3,5"
        ) from None
