"""``lmscope scan``: run a model over a corpus; exact per-unit statistics, top contexts, head statistics, dumps."""

from __future__ import annotations

import sys

from ..errors import LmscopeError
from .common import add_model_arg, add_verb, check_out_dir, load_model

EXAMPLE = (
    "lmscope scan --model smollm2 --corpus notes/ data.jsonl --field text --max-tokens 2000000 "
    "--seq-len 128 --sites 'blocks.*.mlp.hidden' --heads --top-k 20 --out scan/"
)


def add_parser(sub) -> None:
    p = add_verb(
        sub, "scan", "what every neuron and head does across a corpus (streamed, resumable)", EXAMPLE, run
    )
    add_model_arg(p)
    p.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        help="text files, folders of them, .jsonl, .parquet, a datasets save_to_disk folder, or 'builtin'",
    )
    p.add_argument("--field", help="the text key (JSONL) or column (Parquet, datasets)")
    p.add_argument(
        "--out", required=True, help="output directory (scan.json, stats, top contexts, report.html)"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    p.add_argument(
        "--seq-len", type=int, default=128, help="tokens per window, special tokens included (default: 128)"
    )
    p.add_argument(
        "--sites",
        default="blocks.*.mlp.hidden",
        help="comma-separated capture names or globs whose units are scanned (default: blocks.*.mlp.hidden)",
    )
    p.add_argument("--top-k", type=int, default=20, help="top contexts kept per unit (default: 20)")
    p.add_argument(
        "--heads", action="store_true", help="also characterize every attention head over the corpus"
    )
    p.add_argument("--dump", default=None, help="comma-separated sites whose activations are saved (fp16)")
    p.add_argument("--dump-max-gb", type=float, default=4.0, help="stop dumping past this size (default: 4)")
    p.add_argument("--hist-bins", type=int, default=64, help="histogram bins per unit (default: 64)")
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=65536,
        help="tokens per shard, the unit of checkpointing (default: 65536)",
    )
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per forward batch (default: 2048)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted scan in --out")
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run shards on Ray: 'auto' starts a local runtime, an address joins a cluster (pip install lmscope[scale])",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="Ray actors, each holding the model once (default: 2)"
    )
    p.add_argument("--no-report", action="store_true", help="skip report.html")


def run(args) -> int:
    from ..scan import Corpus, scan
    from ..scan.engine import stderr_progress

    check_out_dir(args.out)
    corpus = Corpus(
        args.corpus, args.field
    )  # missing paths and a missing --field fail before the model loads
    if args.ray:
        from ..scan.distributed import require_ray

        require_ray()
    lm = load_model(args.model)
    dump = [d for d in (args.dump or "").split(",") if d.strip()]
    result = scan(
        lm,
        corpus,
        args.out,
        sites=[s for s in args.sites.split(",") if s.strip()],
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        top_k=args.top_k,
        heads=args.heads,
        dump=dump,
        dump_max_gb=args.dump_max_gb,
        hist_bins=args.hist_bins,
        shard_tokens=args.shard_tokens,
        batch_tokens=args.batch_tokens,
        resume=args.resume,
        ray=args.ray,
        workers=args.workers,
        progress=stderr_progress,
        report=not args.no_report,
    )
    info = result.info
    skipped = info["corpus"]["skipped"]
    if skipped["not_utf8_or_binary"]:
        print(
            f"lmscope: skipped {skipped['not_utf8_or_binary']} non-UTF-8 or binary document(s)",
            file=sys.stderr,
        )
    if info["tokens"] == 0:
        raise LmscopeError("no tokens were scanned", "pass a corpus with text")
    print(f"{args.out.rstrip('/')}/{'scan.json' if args.no_report else 'report.html'}")
    return 0
