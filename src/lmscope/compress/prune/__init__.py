"""Pruning: unstructured (magnitude, Wanda, N:M) and structured, physically removed (heads, neurons, layers).

Importing this package registers the recipe step handlers with ``lmscope.compress.recipe``.
"""

from __future__ import annotations

from ..registry import register_step
from ..steps import KeepHeads, KeepNeurons, PruneHeads, PruneLayers, PruneNeurons, PruneUnstructured
from .heads import head_scores, plan_heads, prune_heads, rebuild_heads, remove_heads
from .layers import block_influence, prune_layers, rebuild_layers, remove_layers
from .neurons import neuron_scores, prune_neurons, rebuild_neurons, remove_neurons
from .unstructured import HONEST_NOTE, prune_unstructured


@register_step(PruneUnstructured)
class UnstructuredPruner:
    def apply(self, lm, step, calib) -> dict:
        only = step.selected_modules(lm) if step.modules else None
        return prune_unstructured(lm, step.sparsity, step.method, step.n_m, calib, targets=only)

    def rebuild(self, model, step, info) -> None:
        """Nothing to rebuild: the zeros live in the dense state dict."""


@register_step(PruneHeads)
class HeadPruner:
    def apply(self, lm, step, calib) -> dict:
        return prune_heads(lm, step.fraction, step.method, calib, step.seed, layers=step.selected_layers(lm))

    def rebuild(self, model, step, info) -> None:
        rebuild_heads(model, info)


@register_step(PruneNeurons)
class NeuronPruner:
    def apply(self, lm, step, calib) -> dict:
        return prune_neurons(
            lm, step.fraction, step.method, calib, step.seed, layers=step.selected_layers(lm)
        )

    def rebuild(self, model, step, info) -> None:
        rebuild_neurons(model, info)


def _before_refit(lm, step, calib, keep, path) -> dict:
    """For a keep step with ``refit``: the Gram matrices (collected once per compress call) and the consuming
    projection's [out, in] weights before slicing, by layer; {} without refit."""
    if not step.refit or not keep:
        return {}
    from ._linear import weight_out_in
    from .refit import calibration_grams

    grams = calibration_grams(lm, calib, step.refit, step.kind)
    return {i: (weight_out_in(lm.blocks[i].get_submodule(path)).detach().clone(), grams) for i in keep}


def _refit(lm, step, kind, path, full, columns) -> dict:
    from .refit import refit_projection

    out = {}
    for i, (weight, grams) in full.items():
        r = refit_projection(lm.blocks[i], path, weight, grams[(kind, i)], columns[i], step.refit["damp"])
        out[str(i)] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
    return out


@register_step(KeepHeads)
class HeadKeeper:
    """Explicit kept heads per layer (a searched architecture), checked against masking like prune_heads."""

    def apply(self, lm, step, calib) -> dict:
        from .heads import _check_exact, _masked_reference

        keep = {int(k): v for k, v in step.layers.items() if len(v) < lm.n_heads_at(int(k))}
        full = _before_refit(lm, step, calib, keep, lm.family.o)
        probe, masked = _masked_reference(lm, keep)
        layers = remove_heads(lm, keep)
        _check_exact(lm, probe, masked)
        info = {"n_layers": lm.n_layers, "layers": layers}
        if full:
            from .refit import head_columns

            info["refit"] = _refit(
                lm, step, "attn", lm.family.o, full, {i: head_columns(lm, h) for i, h in keep.items()}
            )
        return info

    def rebuild(self, model, step, info) -> None:
        rebuild_heads(model, info)


@register_step(KeepNeurons)
class NeuronKeeper:
    def apply(self, lm, step, calib) -> dict:
        keep = {int(k): v for k, v in step.layers.items() if len(v) < lm.d_mlp_at(int(k))}
        full = _before_refit(lm, step, calib, keep, lm.family.mlp_out)
        info = {"n_layers": lm.n_layers, "layers": remove_neurons(lm, keep)}
        if full:
            info["refit"] = _refit(lm, step, "mlp", lm.family.mlp_out, full, keep)
        return info

    def rebuild(self, model, step, info) -> None:
        rebuild_neurons(model, info)


@register_step(PruneLayers)
class LayerPruner:
    def apply(self, lm, step, calib) -> dict:
        return prune_layers(lm, step.layers)

    def rebuild(self, model, step, info) -> None:
        rebuild_layers(model, info)


__all__ = [
    "HONEST_NOTE",
    "block_influence",
    "head_scores",
    "neuron_scores",
    "plan_heads",
    "prune_heads",
    "prune_layers",
    "prune_neurons",
    "prune_unstructured",
    "rebuild_heads",
    "rebuild_layers",
    "rebuild_neurons",
    "remove_heads",
    "remove_layers",
    "remove_neurons",
]
