"""Start transformers without optional packages lmscope never uses through it (faster first forward).

``import transformers.modeling_utils`` imports torchao (its quantizer integration) and scipy.optimize
(object-detection losses) whenever they are installed: about 1.5 s of CPU in a fresh process, for code
lmscope never reaches (lmscope's own compression imports torchao directly, when it runs). Telling
transformers those two packages are absent — a configuration it supports — skips both. Done once, only
when ``transformers.modeling_utils`` has not been imported yet (so transformers never sees two answers),
and not when ``LMSCOPE_FULL_TRANSFORMERS=1`` is set (then transformers sees every package, e.g. to load
a checkpoint quantized with torchao through transformers itself).

Only the CLI calls it, first thing in its own process; ``import lmscope`` in a user's program leaves their
transformers as it finds it.
"""

from __future__ import annotations

import os
import sys

#: packages transformers is told are absent
HIDDEN = ("torchao", "scipy")


def lean_transformers() -> bool:
    """Hide ``HIDDEN`` from transformers' availability checks; True when that was done now."""
    if os.environ.get("LMSCOPE_FULL_TRANSFORMERS", "").strip() not in ("", "0"):
        return False
    if "transformers.modeling_utils" in sys.modules:
        return False
    try:
        from transformers.utils import import_utils
    except ImportError:
        return False
    original = getattr(import_utils, "_is_package_available", None)
    if original is None or getattr(original, "_lmscope_lean", False):
        return False

    def is_package_available(pkg_name: str, return_version: bool = False):
        if pkg_name in HIDDEN:
            return False, ("N/A" if return_version else None)
        return original(pkg_name, return_version)

    is_package_available._lmscope_lean = True
    import_utils._is_package_available = is_package_available
    for check in ("is_torchao_available", "is_scipy_available"):  # answers cached before now
        clear = getattr(getattr(import_utils, check, None), "cache_clear", None)
        if clear is not None:
            clear()
    return True
