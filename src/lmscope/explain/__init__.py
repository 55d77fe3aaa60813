"""Explain a model's output: attributions with faithfulness, logit lens, heads, patching.

``explain(lm, text, target=...)`` is the entry point; ``lmscope.explain.heads`` and
``lmscope.explain.patching`` hold head analysis and activation patching; ``dla(lm, text, target=...)``
is direct logit attribution.
"""

from .api import explain
from .dla import dla

__all__ = ["dla", "explain"]
