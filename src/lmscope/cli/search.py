"""``lmscope search``: find a per-layer compression under a budget (EvoPress-style evolution with staged KL
fitness); write pareto.json, recipe.json (for ``lmscope compress --recipe``) and report.html."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LmscopeError
from .common import add_model_arg, add_verb, check_out_dir, load_model, read_text_file, show_path

EXAMPLE = "lmscope search --model smollm2 --budget bytes=0.16 --space quant --out found/"


def add_parser(sub) -> None:
    p = add_verb(
        sub, "search", "search a per-layer compression under a budget; write its Pareto front", EXAMPLE, run
    )
    add_model_arg(p)
    p.add_argument(
        "--budget",
        required=True,
        help="KIND=FRACTION of the original: bytes=0.16 (of fp32 bytes, --space quant) or params=0.75 (of the "
        "block parameters, --space heads,neurons,layers)",
    )
    p.add_argument(
        "--space",
        default="quant",
        help="what each layer chooses: quant (precision levels), or any of heads,neurons,layers (heads kept, "
        "MLP neurons kept, block kept or dropped)",
    )
    p.add_argument(
        "--levels",
        default="float,int8,int4-g32,int4-g64,int4-g128",
        help="precision levels a layer may take (default: float,int8,int4-g32,int4-g64,int4-g128)",
    )
    p.add_argument("--granularity", default="kind", help="kind (block x attention/MLP, default) or block")
    p.add_argument("--out", required=True, help="folder for pareto.json, recipe.json, report.html, search.db")
    p.add_argument("--max-evals", type=int, default=200, help="fitness evaluations in all (default 200)")
    p.add_argument("--time-limit", help="stop after this long, e.g. 90s, 30m, 1h; the best so far is written")
    p.add_argument("--seed", type=int, default=0, help="fixes the whole search (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the search stored in --out")
    p.add_argument(
        "--calibration-file", help="UTF-8 calibration text (default: the built-in calibration half)"
    )
    p.add_argument(
        "--calibration-tokens", type=int, default=512, help="tokens of the last KL stage (default 512)"
    )
    p.add_argument(
        "--heldout-tokens", type=int, default=1024, help="held-out tokens for perplexity (default 1024)"
    )
    p.add_argument("--offspring", type=int, default=8, help="children per generation (default 8)")
    p.add_argument(
        "--prior",
        default="sensitivity",
        help="how seeds are placed: sensitivity (one KL probe per unit first, default), error (quant: weight "
        "error only), priors (structured: head/neuron/block priors, no probes; for slow machines)",
    )
    p.add_argument(
        "--simulate",
        action="store_true",
        help="score candidates with fp32 layers holding the de-quantized weights (faster on CPUs without bf16 "
        "units; KL close to, not equal to, the real kernels')",
    )
    p.add_argument(
        "--baseline-gptq", action="store_true", help="also run uniform GPTQ int4 g64 as a baseline (slow)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def parse_duration(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise LmscopeError(f"--time-limit '{text}' is not a duration", "e.g. --time-limit 30m (s, m or h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _baselines(args) -> dict:
    from ..compress.recipe import Quantize, Recipe

    return {"gptq4-g64": Recipe((Quantize("gptq4", group_size=64),))} if args.baseline_gptq else {}


def run(args) -> int:
    from ..compress.search import STORE_FILE, Budget, search
    from ..compress.search.space import parse_spaces
    from ..compress.search.store import _optuna

    budget = Budget.parse(args.budget)  # every bad value fails here, before the model loads
    spaces = parse_spaces(args.space)
    from ..compress.search.structure import STRUCT_SPACES

    structured = set(spaces) <= set(STRUCT_SPACES)
    if structured and budget.kind != "params":
        raise LmscopeError(
            f"a {budget.kind} budget does not apply to --space {args.space}",
            "use --budget params=FRACTION (of the block parameters kept)",
        )
    if not structured and spaces != ("quant",):
        raise LmscopeError(
            f"search space '{args.space}' is not built yet (quant cannot be combined with heads/neurons/layers "
            "in one search)",
            "use --space quant, or --space heads,neurons,layers",
        )
    if not structured and budget.kind != "bytes":
        raise LmscopeError(
            f"a {budget.kind} budget does not apply to --space quant", "use --budget bytes=FRACTION"
        )
    time_limit = parse_duration(args.time_limit)
    if args.max_evals < 1:
        raise LmscopeError(f"--max-evals must be at least 1, got {args.max_evals}", "e.g. --max-evals 200")
    levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
    store = Path(args.out) / STORE_FILE
    if args.resume and not store.is_file():
        raise LmscopeError(f"there is no search to resume in '{args.out}'", "run it first without --resume")
    if not args.resume and store.exists():
        raise LmscopeError(f"'{args.out}' already holds a search", "pass --resume, or choose another --out")
    check_out_dir(args.out)
    calib = read_text_file(args.calibration_file) if args.calibration_file else None
    if calib is not None and not calib.strip():
        raise LmscopeError(
            f"calibration file '{args.calibration_file}' is empty", "pass a file with some text"
        )
    _optuna()
    lm = load_model(args.model)
    from .. import progress

    def make_store_dir():
        Path(args.out).mkdir(parents=True, exist_ok=True)

    with progress.enabled(not args.quiet):
        result = search(
            lm,
            budget,
            ",".join(spaces),
            levels=levels,
            granularity=args.granularity,
            calibration_text=calib,
            calibration_tokens=args.calibration_tokens,
            heldout_tokens=args.heldout_tokens,
            max_evals=args.max_evals,
            time_limit=time_limit,
            seed=args.seed,
            offspring=args.offspring,
            prior=args.prior,
            store=store,
            resume=args.resume,
            before_store=make_store_dir,
            baselines=_baselines(args),
            simulate=args.simulate,
        )
    result.write(args.out)
    print(result.to_text())
    if result.chosen is None:
        print("no configuration within the budget was evaluated at the last stage: raise --max-evals")
        return 0
    print(f"chosen: {result.chosen_point['describe']}")
    print(
        f"wrote {show_path(args.out)}/ pareto.json, recipe.json, report.html, {STORE_FILE}; "
        f"reproduce with: lmscope compress --model {args.model} --recipe {show_path(args.out)}/recipe.json --out DIR"
    )
    return 0
