"""int4 weight-only, asymmetric per group, round to nearest (RTN); codes packed two per byte. ``int4``: an fp16
scale and a uint8 zero point per group; ``int4m``: an fp16 scale and an fp16 minimum per group ("scale and min",
GGUF Q4_1's layout, torchao's float zero point), 4 + 32/group bits per weight."""

from __future__ import annotations

from . import Quantized, scheme
from . import _common as C


def _rtn(kind: str, make, how: str):
    def quantize(lm, step, calib, targets) -> list[Quantized]:
        g = step.group_size
        return [
            Quantized(
                n,
                make(lin, g),
                kind,
                lin.weight.detach().float(),
                lin.bias,
                f"int4 g{g} {how}",
                meta={"group_size": g},
            )
            for n, lin in targets
        ]

    return scheme(kind)(quantize)


quantize_int4 = _rtn("int4", C.make_int4, "RTN")
quantize_int4m = _rtn("int4m", C.make_int4m, "scale+min RTN")
