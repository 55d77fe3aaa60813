"""``lmscope serve``: explore models in the browser (inspect, explain, heads, compare, audit, features) on 127.0.0.1."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..errors import LmscopeError
from .common import add_model_arg, add_verb, load_model

EXAMPLE = (
    "lmscope serve --model smollm2 --model minilm --port 8765\n"
    "  lmscope serve --model smollm2 --sae sae/ --explanations feats/ --max-upload-mb 64"
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def add_parser(sub) -> None:
    p = add_verb(
        sub,
        "serve",
        "explore models in the browser: inspect, explain, heads, compare, audit a dataset, features",
        EXAMPLE,
        run,
    )
    add_model_arg(p, multiple=True)
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default: 8765)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; anything else exposes the models)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="longest text a request may send, in tokens (default: 256)",
    )
    p.add_argument(
        "--max-chars",
        type=int,
        default=4000,
        help="longest text a request may send, in characters (default: 4000)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=32,
        help="largest file the Audit tab may upload, in MB (default: 32); it lives in a temporary folder "
        "removed after its audit",
    )
    p.add_argument(
        "--max-audit-cases", type=int, default=5000, help="most cases one audit may run (default: 5000)"
    )
    p.add_argument(
        "--sae",
        action="append",
        metavar="DIR",
        help="a dictionary for the Features tab (lmscope features train --out, or a SAELens folder); repeatable",
    )
    p.add_argument(
        "--explanations",
        action="append",
        metavar="DIR",
        help="the lmscope features explain --out folder of the matching --sae (same order; default: an "
        "explanations.json inside the dictionary folder)",
    )


def model_ids(specs: list[str]) -> list[str]:
    """Short, unique ids for the page: 'smollm2', 'small' for 'runs/small/', 'small-2' for a second one."""
    ids: list[str] = []
    for spec in specs:
        base = Path(spec.rstrip("/\\")).name or spec
        base = base.removesuffix(".gguf") or "model"
        mid, k = base, 2
        while mid in ids:
            mid, k = f"{base}-{k}", k + 1
        ids.append(mid)
    return ids


def check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise LmscopeError(
            f"--port {port} is not a port number", "pass a number from 1 to 65535, e.g. --port 8765"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LmscopeError(
                f"cannot listen on {host}:{port} ({e.strerror})",
                "pass another --port, or stop what is using this one",
            ) from None


def run(args) -> int:
    from ..web.server import Limits, create_app

    specs = args.model or ["smollm2"]
    if args.max_tokens < 1 or args.max_chars < 1:
        raise LmscopeError("--max-tokens and --max-chars must be positive", "e.g. --max-tokens 256")
    if args.max_upload_mb <= 0 or args.max_audit_cases < 1:
        raise LmscopeError(
            "--max-upload-mb and --max-audit-cases must be positive", "e.g. --max-upload-mb 32"
        )
    if len(args.explanations or []) > len(args.sae or []):
        raise LmscopeError(
            "more --explanations than --sae", "pass one --explanations per --sae, in the same order"
        )
    check_port(args.host, args.port)
    if args.host not in LOCAL_HOSTS:
        print(
            f"lmscope: warning: listening on {args.host}: anyone who can reach this address can run the "
            "served models; the page has no login",
            file=sys.stderr,
        )
    from ..web.features import load_dictionary

    dictionaries = {}  # loaded before the models: a bad folder fails fast
    explanations = list(args.explanations or [])
    for k, (did, folder) in enumerate(zip(model_ids(args.sae or []), args.sae or [])):
        dictionaries[did] = load_dictionary(folder, explanations[k] if k < len(explanations) else None, did)
    models = {}
    for mid, spec in zip(model_ids(specs), specs):
        lm = load_model(spec)
        models[mid] = lm
        print(f"{mid}: {lm!r}", file=sys.stderr)
    local = ["127.0.0.1", "localhost"] if args.host in ("127.0.0.1", "localhost") else None
    limits = Limits(
        max_tokens=args.max_tokens,
        max_chars=args.max_chars,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_audit_cases=args.max_audit_cases,
    )
    for did, entry in dictionaries.items():
        print(f"{did}: {entry.sae!r}, {entry.describe()['explained']} features explained", file=sys.stderr)
    app = create_app(models, limits, allowed_hosts=local, dictionaries=dictionaries)
    import uvicorn

    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"lmscope serve: open http://{shown}:{args.port}  (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
