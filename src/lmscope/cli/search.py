"""``lmscope search``: find a per-layer compression under a budget (EvoPress-style evolution with staged KL
fitness); write pareto.json, recipe.json (for ``lmscope compress --recipe``) and report.html."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LmscopeError
from .common import add_model_arg, add_verb, check_out_dir, load_model, read_text_file, show_path

QUANT_LEVELS = "float,int8,int4-g32,int4-g64,int4-g128"
EXAMPLE = "lmscope search --model smollm2 --budget bytes=0.16 --space quant --out found/"


def add_parser(sub) -> None:
    p = add_verb(
        sub, "search", "search a per-layer compression under a budget; write its Pareto front", EXAMPLE, run
    )
    add_model_arg(p)
    p.add_argument(
        "--budget",
        required=True,
        help="KIND=FRACTION of the original: bytes=0.16 (of fp32 bytes, --space quant or quant with structure); "
        "latency=0.9 (any space but sparsity: mean of the measured prefill and decode ratios, from a per-layer "
        "latency table measured once on this machine and cached); params=0.75 (of the block parameters: kept by "
        "--space heads,neurons,layers, non-zero by --space sparsity)",
    )
    p.add_argument(
        "--latency-table",
        help="a latency table JSON measured earlier for this model, levels, threads and CPU",
    )
    p.add_argument(
        "--space",
        default="quant",
        help="what each layer chooses: quant (precision levels); any of heads,neurons,layers (heads kept, MLP "
        "neurons kept, block kept or dropped); quant with any of those (both in one search); or sparsity (Wanda level per block, with --budget params=F: F of "
        "the block weights kept; --levels default 0.5,0.55,...,0.9)",
    )
    p.add_argument(
        "--levels",
        default=QUANT_LEVELS,
        help="precision levels a layer may take (default: float,int8,int4-g32,int4-g64,int4-g128; also "
        "int4m-g32, int4m-g64, int4m-g128: int4 with an fp16 scale and minimum per group (GGUF Q4_1's layout); "
        "gptq-g32, gptq-g64, gptq-g128: GPTQ per layer from the original model's calibration inputs; w8a8)",
    )
    p.add_argument(
        "--embedding",
        default="int8",
        help="the token embedding + tied LM head in every configuration: int8 (default), int4-gN, int4m-gN or gptq4-gN "
        "(GPTQ on the head's inputs), leaving its bytes to the blocks; or float: as in the original model (its "
        "fp32 bytes counted; on CPUs without bf16 matmul units its prefill is faster than int8's, which a "
        "latency budget feels)",
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
    p.add_argument(
        "--ray",
        metavar="auto|ADDRESS",
        help="score candidates on Ray actors: auto (a local runtime) or a cluster address (extra lmscope[scale])",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray actors with --ray (default 2)")
    p.add_argument(
        "--no-refit",
        action="store_true",
        help="structured spaces: slice heads/neurons without re-solving o_proj/down_proj by least squares",
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


def _run_sparsity(args, budget) -> int:
    """``--space sparsity --budget params=F``: per-block Wanda levels keeping F of the block weights non-zero."""
    from ..compress.search import STORE_FILE
    from ..compress.search.sparsity import DEFAULT_SPARSITY_LEVELS, search_sparsity
    from ..compress.search.store import _optuna

    if budget.kind != "params" or budget.fraction >= 1:
        raise LmscopeError(
            f"a {budget} budget does not apply to --space sparsity",
            "use --budget params=F (F of the block weights kept non-zero, e.g. params=0.3 for 70% sparsity)",
        )
    if args.ray is not None or args.latency_table is not None:
        raise LmscopeError(
            "--space sparsity runs in-process and has no latency budget", "drop --ray/--latency-table"
        )
    levels = DEFAULT_SPARSITY_LEVELS if args.levels == QUANT_LEVELS else tuple(args.levels.split(","))
    time_limit = parse_duration(args.time_limit)
    if args.max_evals < 1:
        raise LmscopeError(f"--max-evals must be at least 1, got {args.max_evals}", "e.g. --max-evals 200")
    store = Path(args.out) / STORE_FILE
    if args.resume and not store.is_file():
        raise LmscopeError(f"there is no search to resume in '{args.out}'", "run it first without --resume")
    if not args.resume and store.exists():
        raise LmscopeError(f"'{args.out}' already holds a search", "pass --resume, or choose another --out")
    check_out_dir(args.out)
    calib = read_text_file(args.calibration_file) if args.calibration_file else None
    _optuna()
    lm = load_model(args.model)
    from .. import progress

    with progress.enabled(not args.quiet):
        result = search_sparsity(
            lm,
            round(1 - budget.fraction, 9),
            levels=levels,
            calibration_text=calib,
            calibration_tokens=args.calibration_tokens,
            heldout_tokens=args.heldout_tokens,
            max_evals=args.max_evals,
            time_limit=time_limit,
            seed=args.seed,
            offspring=args.offspring,
            store=store,
            resume=args.resume,
            before_store=lambda: Path(args.out).mkdir(parents=True, exist_ok=True),
        )
    result.write(args.out)
    print(result.to_text())
    if result.chosen is None:
        print("no configuration within the budget was evaluated at the last stage: raise --max-evals")
        return 0
    print(
        f"wrote {show_path(args.out)}/ pareto.json, recipe.json, report.html, {STORE_FILE}; "
        f"reproduce with: lmscope compress --model {args.model} --recipe {show_path(args.out)}/recipe.json --out DIR"
        + (" --calibration-file " + args.calibration_file if args.calibration_file else "")
    )
    return 0


def run(args) -> int:
    from ..compress.search import STORE_FILE, Budget, search
    from ..compress.search.space import parse_spaces
    from ..compress.search.store import _optuna

    budget = Budget.parse(args.budget)  # every bad value fails here, before the model loads
    spaces = parse_spaces(args.space)
    if spaces == ("sparsity",):
        return _run_sparsity(args, budget)
    if "sparsity" in spaces:
        raise LmscopeError(
            "the sparsity space is searched on its own (its budget is the non-zero weights kept)",
            "use --space sparsity --budget params=0.3 (70% sparsity)",
        )
    from ..compress.search.structure import STRUCT_SPACES

    structured = set(spaces) <= set(STRUCT_SPACES)
    if structured and budget.kind not in ("params", "latency"):
        raise LmscopeError(
            f"a {budget.kind} budget does not apply to --space {args.space}",
            "use --budget params=FRACTION (of the block parameters kept) or latency=FRACTION",
        )
    if not structured and spaces != ("quant",):  # quant with heads/neurons/layers: one search
        if budget.kind not in ("bytes", "latency"):
            raise LmscopeError(
                f"a {budget.kind} budget cannot be combined with quant in --space {args.space}: precision and "
                "structure are searched together under a bytes or latency budget",
                "use --budget bytes=FRACTION (of the fp32 bytes) or latency=FRACTION",
            )
    if not structured and budget.kind not in ("bytes", "latency"):
        raise LmscopeError(
            f"a {budget.kind} budget does not apply to --space quant",
            "use --budget bytes=FRACTION or latency=FRACTION",
        )
    if args.latency_table is not None and not Path(args.latency_table).is_file():
        raise LmscopeError(
            f"there is no latency table at '{args.latency_table}'",
            "drop --latency-table to measure one on this machine (cached for the next run)",
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
    if args.ray is not None:
        from ..scan.distributed import require_ray

        require_ray()
        if args.workers < 1:
            raise LmscopeError(f"--workers must be at least 1, got {args.workers}", "e.g. --workers 2")
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
            embedding=args.embedding,
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
            latency_table=args.latency_table,
            ray=args.ray,
            workers=args.workers,
            **({"structure": {"refit": False}} if args.no_refit else {}),
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
