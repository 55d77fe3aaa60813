"""The ``scan`` report: a neuron browser (top contexts, histogram, summary per unit) and the head atlas."""

from __future__ import annotations

from .html import Report


def scan_report(result) -> Report:
    info = result.info
    rep = Report(f"lmscope scan: {info['model']['name']}", f"{info['tokens']:,} tokens")
    return rep
