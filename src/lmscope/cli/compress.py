"""``lmscope compress``: quantize / prune / factor a model by flags or a JSON recipe; save it, its report
(structure diff + per-layer SQNR) and compress.json. Flags build the same recipe steps a JSON file holds."""

from __future__ import annotations

import argparse
import json

from ..errors import LmscopeError
from .common import (
    add_model_arg,
    add_verb,
    atomic_out,
    check_out_dir,
    load_model,
    parse_int_list,
    read_text_file,
    show_path,
)

EXAMPLE = "lmscope compress --model smollm2 --quantize int8 --out small/"
STEP_FLAGS = (
    "quantize",
    "prune_heads",
    "prune_unstructured",
    "prune_neurons",
    "prune_layers",
    "lowrank_rank",
    "lowrank_energy",
)


class _Ordered(argparse.Action):
    """Store the value and remember the order step flags were given in."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        order = list(getattr(namespace, "_step_order", None) or [])
        if self.dest not in order:
            order.append(self.dest)
        namespace._step_order = order


def add_parser(sub) -> None:
    p = add_verb(sub, "compress", "quantize, prune or factor a model; save it with a report", EXAMPLE, run)
    add_model_arg(p)
    q = p.add_argument_group("quantization")
    q.add_argument(
        "--quantize",
        action=_Ordered,
        metavar="SCHEME",
        help="int8 | int4 | int4m | w8a8 | w8a8-smooth | gptq4",
    )
    q.add_argument("--group-size", type=int, help="int4/int4m/gptq4 group size: 32, 64 (default) or 128")
    pr = p.add_argument_group("pruning and low-rank")
    pr.add_argument(
        "--prune-heads", action=_Ordered, type=float, metavar="F", help="fraction of attention heads"
    )
    pr.add_argument("--prune-unstructured", action=_Ordered, type=float, metavar="S", help="weight sparsity")
    pr.add_argument(
        "--prune-method",
        help="heads: importance|magnitude|random; unstructured: magnitude|wanda; "
        "neurons: magnitude|activation|random",
    )
    pr.add_argument("--n-m", help="N:M structured sparsity with --prune-unstructured, e.g. 2:4")
    pr.add_argument(
        "--prune-neurons", action=_Ordered, type=float, metavar="F", help="fraction of MLP neurons"
    )
    pr.add_argument("--prune-layers", action=_Ordered, metavar="I,J", help="remove these blocks")
    pr.add_argument(
        "--lowrank-rank", action=_Ordered, type=int, metavar="R", help="SVD rank for block linears"
    )
    pr.add_argument(
        "--lowrank-energy",
        action=_Ordered,
        type=float,
        metavar="E",
        help="keep the rank holding this fraction of spectral energy",
    )
    p.add_argument(
        "--modules",
        metavar="GLOBS",
        help="comma-separated module fqn globs every step is limited to, e.g. 'model.layers.*.mlp.*' "
        "(a glob matching nothing is an error)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.add_argument("--recipe", help='a JSON recipe file ({"steps": [...]}) instead of the flags')
    p.add_argument(
        "--calibration-file", help="UTF-8 calibration text (default: lmscope's built-in calibration half)"
    )
    p.add_argument("--out", help="write the compressed model, report.html and compress.json here")


def _only(options: dict, *keys) -> dict:
    return {k: v for k, v in options.items() if k in keys}


def build_recipe(args):
    """The Recipe the flags (in the order given; structure first when stacked) or --recipe describe."""
    from ..compress.recipe import (
        LowRank,
        PruneHeads,
        PruneLayers,
        PruneNeurons,
        PruneUnstructured,
        Quantize,
        Recipe,
    )

    order = list(getattr(args, "_step_order", None) or [])
    if args.recipe:
        if order:
            raise LmscopeError(
                "--recipe cannot be combined with step flags", "put every step in the recipe file"
            )
        if getattr(args, "modules", None):
            raise LmscopeError(
                "--modules cannot be combined with --recipe", 'put "modules" in each recipe step'
            )
        return Recipe.from_json(args.recipe)
    if args.group_size is not None and args.quantize is None:
        raise LmscopeError("--group-size needs --quantize int4 or gptq4", "add --quantize int4")
    if args.n_m is not None and args.prune_unstructured is None:
        raise LmscopeError("--n-m needs --prune-unstructured", "e.g. --prune-unstructured 0.5 --n-m 2:4")
    if args.prune_method and not {"prune_heads", "prune_unstructured", "prune_neurons"} & set(order):
        raise LmscopeError(
            "--prune-method needs --prune-heads, --prune-unstructured or --prune-neurons", "add one of them"
        )
    method = {"method": args.prune_method} if args.prune_method else {}
    if getattr(args, "modules", None):
        method["modules"] = tuple(g.strip() for g in args.modules.split(",") if g.strip())
    steps, lowrank_done = [], False
    for dest in order:
        if dest == "quantize":
            steps.append(Quantize(args.quantize, group_size=args.group_size, **_only(method, "modules")))
        elif dest == "prune_heads":
            steps.append(PruneHeads(args.prune_heads, **method))
        elif dest == "prune_unstructured":
            steps.append(PruneUnstructured(args.prune_unstructured, n_m=args.n_m, **method))
        elif dest == "prune_neurons":
            steps.append(PruneNeurons(args.prune_neurons, **method))
        elif dest == "prune_layers":
            layers = tuple(parse_int_list(args.prune_layers, "--prune-layers") or ())
            steps.append(PruneLayers(layers, **_only(method, "modules")))
        elif dest in ("lowrank_rank", "lowrank_energy") and not lowrank_done:
            steps.append(
                LowRank(rank=args.lowrank_rank, energy=args.lowrank_energy, **_only(method, "modules"))
            )
            lowrank_done = True
    return Recipe.of(*steps)


def run(args) -> int:
    recipe = build_recipe(args)  # every bad value fails here, before any model is loaded
    if args.out:
        check_out_dir(args.out)
    calib = read_text_file(args.calibration_file) if args.calibration_file else None
    if calib is not None and not calib.strip():
        raise LmscopeError(
            f"calibration file '{args.calibration_file}' is empty", "pass a file with some text"
        )
    from ..compress.apply import compress

    lm = load_model(args.model)
    recipe.check(lm)
    from .. import progress

    with progress.enabled(not getattr(args, "quiet", False)):
        result = compress(lm, recipe, calibration_text=calib)
    print(result.to_text())
    from ..views.compress import removed_counts

    for what, before, after, removed in removed_counts(result):
        print(f"{what}: {before} -> {after} ({removed} removed)")
    diff = result.structure_diff()
    if diff is not None:
        print(diff.summary())
    if not args.out:
        print("nothing saved (pass --out DIR to save the model and its report)")
        return 0
    from ..compress.storage import write_compressed

    with atomic_out(args.out) as tmp:
        write_compressed(tmp, result.lm, result.recipe, result.infos)
        result.report(tmp / "report.html")
        summary = result.summary()
        if diff is not None:
            summary["structure"] = diff.totals()
        (tmp / "compress.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    loads = json.loads((__import__("pathlib").Path(args.out) / "lmscope_recipe.json").read_text())[
        "loads_in_transformers"
    ]
    print(
        f"wrote {show_path(args.out)}/ (model.safetensors, config, tokenizer, lmscope_recipe.json, manifest), "
        f"report.html, compress.json; "
        + (
            "also loads in plain transformers"
            if loads
            else "load it with lmscope.load (not plain transformers)"
        )
    )
    return 0
