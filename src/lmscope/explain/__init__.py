"""Explain a model's output: attributions with faithfulness, logit lens, heads, patching.

``explain(lm, text, target=...)`` is the entry point; ``lmscope.explain.heads`` and
``lmscope.explain.patching`` hold head analysis and activation patching.
"""

from .api import explain

__all__ = ["explain"]
