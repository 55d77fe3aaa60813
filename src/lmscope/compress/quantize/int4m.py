"""int4 weight-only with an fp16 scale and an fp16 minimum per group ("scale and min": GGUF Q4_1's layout,
torchao's float zero point), round to nearest; codes packed two per byte. 4 + 32/group bits per weight."""

from __future__ import annotations

from . import Quantized, scheme
from . import _common as C


@scheme("int4m")
def quantize_int4m(lm, step, calib, targets) -> list[Quantized]:
    g = step.group_size
    return [
        Quantized(
            n,
            C.make_int4m(lin, g),
            "int4m",
            lin.weight.detach().float(),
            lin.bias,
            f"int4 g{g} scale+min RTN",
            meta={"group_size": g},
        )
        for n, lin in targets
    ]
