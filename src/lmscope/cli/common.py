"""Shared CLI plumbing: reading text, opening models, and writing --out atomically."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import LmscopeError
from ..fsutil import atomic_directory


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


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
    """Fail early (before any heavy work) when --out cannot be written."""
    path = Path(out).expanduser()
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path.exists() and not path.is_dir():
        raise LmscopeError(f"--out '{out}' exists and is not a directory", "choose another --out directory")
    if not os.access(parent, os.W_OK):
        raise LmscopeError(f"--out '{out}' is not writable", "choose a directory you can write to")
    return path


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
