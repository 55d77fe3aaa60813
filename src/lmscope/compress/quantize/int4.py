"""int4 weight-only, asymmetric per group, round-to-nearest (RTN); codes packed two per byte."""

from __future__ import annotations

from . import Quantized, scheme
from . import _common as C


@scheme("int4")
def quantize_int4(lm, step, calib, targets) -> list[Quantized]:
    g = step.group_size
    return [
        Quantized(
            n,
            C.make_int4(lin, g),
            "int4",
            lin.weight.detach().float(),
            lin.bias,
            f"int4 g{g} RTN",
            meta={"group_size": g},
        )
        for n, lin in targets
    ]
