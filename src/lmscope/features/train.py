"""A compact dictionary trainer: TopK with AuxK against dead latents (Gao et al. 2024), ReLU + L1, transcoders.

Why not SAELens's loop: it trains from its own ``ActivationsStore``, which runs TransformerLens
``HookedTransformer`` models (a second hooking stack beside lmscope's, and a second copy of the model), and it
pulls wandb and datasets in. lmscope already streams exact activations from the HF model through its own
hooks; the loop itself is ~100 lines. The files it writes are SAELens's, so SAELens reads the result.

Losses are normalized by the batch's variance (the reconstruction term is the batch FVU), which makes the
learning rate independent of the site's scale. Decoder rows stay at unit norm: the gradient along each row is
removed before the step and the rows are renormalized after it. Everything random draws from one
``torch.Generator`` seeded from ``seed``, so a run repeats exactly on the same machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from ..errors import LmscopeError
from .sae import Dictionary, DictionaryConfig


@dataclass(frozen=True)
class TrainSettings:
    kind: str = "topk"
    latents: int = 4608
    k: int | None = 64
    l1_coefficient: float = 0.3  # relu: weight of the L1 term (activations in units of the data's rms)
    lr: float | None = None  # default: 2e-4 · sqrt(16384 / latents) (Gao et al.'s scaling), at least 4e-4
    batch_size: int = 1024
    epochs: int = (
        1  # passes over each in-memory buffer of activations (cheap extra steps when harvest is slow)
    )
    buffer_tokens: int = 262_144
    aux_k: int | None = None  # default: min(512, latents // 2)
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 100_000  # a latent silent for this many training tokens counts as dead for AuxK
    seed: int = 0

    def learning_rate(self) -> float:
        return self.lr or max(4e-4, 2e-4 * math.sqrt(16384 / self.latents))

    def to_json(self) -> dict:
        return asdict(self)


def _shuffled(
    source: Iterable[tuple[torch.Tensor, torch.Tensor]], settings: TrainSettings, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches (x, y) drawn from buffers of ``buffer_tokens`` rows, shuffled, ``epochs`` passes each."""
    xs, ys, n = [], [], 0

    def flush():
        x, y = torch.cat(xs), torch.cat(ys)
        for _ in range(settings.epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x) - settings.batch_size + 1, settings.batch_size):
                idx = order[i : i + settings.batch_size]
                yield x[idx].float(), y[idx].float()

    for x, y in source:
        xs.append(x)
        ys.append(y)
        n += len(x)
        if n >= settings.buffer_tokens:
            yield from flush()
            xs, ys, n = [], [], 0
    if n >= settings.batch_size:
        yield from flush()


def _fvu(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error over the variance around the batch mean (not around zero)."""
    centered = target - target.mean(0, keepdim=True)
    return (recon - target).pow(2).sum() / centered.pow(2).sum().clamp_min(1e-12)


def train_dictionary(
    source: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: DictionaryConfig,
    settings: TrainSettings,
    progress: Callable[[dict], None] | None = None,
) -> tuple[Dictionary, dict]:
    """Train on ``source``: an iterable of ``(x [n, d_in], y [n, d_out])`` rows (y is x for an autoencoder).

    ``progress(info)`` gets ``tokens``, ``tokens_per_s``, ``step``, ``fvu``, ``l0``, ``dead`` every few steps.
    Returns the dictionary and a training log.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    sae = Dictionary(cfg)
    sae.init_weights(gen)
    opt = torch.optim.Adam(sae.parameters(), lr=settings.learning_rate(), betas=(0.9, 0.999), eps=6.25e-10)
    aux_k = settings.aux_k or min(512, cfg.d_sae // 2)
    silent = torch.zeros(cfg.d_sae, dtype=torch.long)  # training tokens since each latent last fired
    started = time.perf_counter()
    tokens = step = 0
    log: list[dict] = []
    b_dec_set = False
    compute = 0.0
    for x, y in _shuffled(source, settings, gen):
        t0 = time.perf_counter()
        if not b_dec_set:  # start the decoder bias at the data mean: latents then model deviations from it
            with torch.no_grad():
                sae.b_dec.copy_(y.mean(0))
            b_dec_set = True
        pre = sae.pre_activations(x)  # [n, d_sae]
        f = sae.activate(pre)
        recon = sae.decode(f)
        loss = _fvu(recon, y)
        fired = (f > 0).any(0)
        silent += len(x)
        silent[fired] = 0
        aux = torch.zeros(())
        if cfg.kind == "relu" or (cfg.kind == "transcoder" and not cfg.k):
            scale = (y - y.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
            aux = settings.l1_coefficient * (f.sum(1) / scale).mean()
            loss_total = loss + aux
        else:
            dead = silent >= settings.dead_tokens
            loss_total = loss
            if dead.any():  # AuxK: the dead latents' top-k model what the live ones left unexplained
                error = (y - recon).detach()
                masked = pre.masked_fill(~dead, float("-inf"))
                kk = min(aux_k, int(dead.sum()))
                values, index = masked.topk(kk, dim=-1)
                f_aux = torch.zeros_like(pre).scatter(-1, index, values.relu())
                aux = _fvu(f_aux @ sae.W_dec, error)
                if torch.isfinite(aux):
                    loss_total = loss + settings.aux_coefficient * aux
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        sae.remove_parallel_gradient()
        opt.step()
        sae.normalize_decoder()
        tokens += len(x)
        step += 1
        compute += time.perf_counter() - t0
        if step % 25 == 0 or step == 1:
            elapsed = time.perf_counter() - started
            info = {
                "step": step,
                "tokens": tokens,
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "train_tokens_per_s": tokens / max(compute, 1e-9),
                "fvu": float(loss.detach()),
                "aux": float(aux.detach()),
                "l0": float((f > 0).sum(1).float().mean()),
                "dead": float((silent >= settings.dead_tokens).float().mean()),
            }
            log.append(info)
            if progress is not None:
                progress(info)
    if step == 0:
        raise LmscopeError(
            f"too few tokens to train: not one batch of {settings.batch_size}",
            "pass more --tokens or a larger corpus, or a smaller --batch-size",
        )
    elapsed = time.perf_counter() - started
    return sae.eval(), {
        "steps": step,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9),  # harvest and training together
        "train_seconds": compute,
        "train_tokens_per_s": tokens / max(compute, 1e-9),  # the optimizer steps alone
        "log": log,
    }


def train(
    lm,
    corpus,
    site: str,
    settings: TrainSettings | None = None,
    tokens: int = 2_000_000,
    seq_len: int = 128,
    scan_dir=None,
    progress: Callable[[dict], None] | None = None,
) -> tuple[Dictionary, dict]:
    """Train a dictionary of ``lm`` at ``site`` on ``tokens`` training tokens of ``corpus`` (the held-out
    windows are never used), streamed from the model — or from ``scan_dir``'s ``--dump`` shards.

    A transcoder (``settings.kind == "transcoder"``) writes ``site`` (``blocks.L.mlp.out``) from the residual
    its MLP reads. Returns the dictionary and the training log (harvest and training throughput included).
    """
    from .activations import check_site, dump_stream, site_width, stream, transcoder_input

    settings = settings or TrainSettings()
    site = check_site(lm, site)
    in_site = transcoder_input(lm, site) if settings.kind == "transcoder" else site
    sites = [in_site] if in_site == site else [in_site, site]
    cfg = DictionaryConfig(
        kind=settings.kind,
        d_in=site_width(lm, in_site),
        d_sae=settings.latents,
        site=in_site,
        d_out=site_width(lm, site),
        out_site=site if in_site != site else None,
        # SAELens has no TopK transcoder: a transcoder is ReLU + L1, its ``transcoder`` architecture
        k=settings.k if settings.kind == "topk" else None,
        l1_coefficient=settings.l1_coefficient if settings.kind != "topk" else None,
        model_name=lm.name,
        context_size=seq_len,
        extra={"settings": settings.to_json(), "tokens": tokens},
    )
    harvest = {"tokens": 0, "seconds": 0.0}

    def source():
        if scan_dir is not None:
            batches = ((acts[in_site], acts[site]) for _, acts in dump_stream(scan_dir, sites))
        else:
            batches = (
                (acts[in_site][:, 1:].reshape(-1, cfg.d_in), acts[site][:, 1:].reshape(-1, cfg.d_out))
                for _, acts in stream(lm, corpus, sites, seq_len, "train")
            )
        while harvest["tokens"] < tokens:
            t0 = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            harvest["seconds"] += time.perf_counter() - t0
            room = tokens - harvest["tokens"]
            x, y = x[:room], y[:room]
            harvest["tokens"] += len(x)
            yield x, y

    sae, log = train_dictionary(source(), cfg, settings, progress)
    log["harvest"] = {
        **harvest,
        "tokens_per_s": harvest["tokens"] / max(harvest["seconds"], 1e-9),
    }
    if harvest["tokens"] < tokens:
        log["corpus_exhausted_at"] = harvest["tokens"]
    return sae, log
