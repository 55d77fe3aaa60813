"""int8 weight-only, symmetric per output channel (the scheme to use when accuracy matters most)."""

from __future__ import annotations

from . import Quantized, scheme
from . import _common as C


@scheme("int8")
def quantize_int8(lm, step, calib, targets) -> list[Quantized]:
    return [
        Quantized(n, C.make_int8(lin), "int8", lin.weight.detach().float(), lin.bias, "int8 per-channel")
        for n, lin in targets
    ]
