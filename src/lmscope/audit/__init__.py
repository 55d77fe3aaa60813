"""``lmscope audit``: a model's decisions over a dataset — explained, tested against counterfactuals, measured per group."""

from .engine import AUDIT_METHODS, AuditResult, audit

__all__ = ["AUDIT_METHODS", "AuditResult", "audit"]
