"""W8A8, naive: int8 weights per channel x int8 activations per token (dynamic), no outlier handling.

On small LMs a few huge activation channels make the per-token scale coarse for every other channel;
this scheme shows that damage. ``w8a8-smooth`` (smooth.py) is the one to use.
"""

from __future__ import annotations

from . import Quantized, scheme
from . import _common as C


@scheme("w8a8")
def quantize_w8a8(lm, step, calib, targets) -> list[Quantized]:
    return [
        Quantized(n, C.make_w8a8(lin), "w8a8", lin.weight.detach().float(), lin.bias, "w8a8 per-token")
        for n, lin in targets
    ]
