"""Training loops (density flows and any loss), with resumable atomic checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from flows import distributed
from flows.checkpoint import load_checkpoint, save_atomic
from flows.cnf import Flow
from flows.likelihood import nll_nats
from flows.odefunc import exact_divergence
from flows.prune import apply_masks_, has_masks, mask_gradients_
from flows.row_noise import mix_seed, per_row_noise

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: Table S1's gaussians column)."""

    iters: int = 1000
    batch_size: int = 1024
    lr: float = 5e-3
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eval_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
        for name in ("iters", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)


@torch.no_grad()
def evaluate_nll(flow: Flow, x: torch.Tensor, batch_size: int = 4096, exact: bool = True) -> float:
    """Mean negative log-likelihood (nats) of x [N, ...] under ``flow``.

    exact=True evaluates with the exact trace whatever the flow trains with.
    """
    if x.shape[0] == 0:
        raise ValueError("evaluate_nll needs at least one sample")
    return nll_sum(flow, x, batch_size, exact) / x.shape[0]


@torch.no_grad()
def nll_sum(
    flow: Flow,
    x: torch.Tensor,
    batch_size: int = 4096,
    exact: bool = True,
    rows: slice | None = None,
    total: int | None = None,
    seed: int = 12345,
) -> float:
    """Sum of -log p (nats) over x [N, ...], rows ``rows`` of a split of ``total`` rows.

    Hutchinson probes (``exact=False``) are drawn per row of the split from
    ``seed`` (``flows.row_noise``), so the sum over shards evaluated by several
    ranks is the one-process sum. Default: x is the whole split. 0 for N = 0.
    """
    first = 0 if rows is None else rows.start or 0
    total = x.shape[0] if total is None else total
    ctx = exact_divergence(flow) if exact else contextlib.nullcontext()
    out = 0.0
    with ctx:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            lo = first + i
            with per_row_noise(seed, slice(lo, lo + xb.shape[0]), total):
                out += -flow.log_prob(xb).sum().item()
    return out


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[config.optimizer](
        params, lr=config.lr, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
    )


LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, ...],
    config: TrainConfig,
    evaluate: Callable[[nn.Module], float] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Minimise ``loss_fn(model, batch)`` over random minibatches of ``data``.

    Args:
        model: any module; if it carries pruning masks (``flows.prune``), pruned
            weights get no gradient and stay exactly zero.
        loss_fn: (model, batch) -> scalar loss, batch being ``data`` indexed by
            one minibatch of rows.
        data: tensors sharing the first dimension N (e.g. (x,) or (x, y)).
        config: optimiser, iterations, batch size, learning-rate steps.
        evaluate: model -> validation loss, called every ``eval_every``
            iterations and at the end (in eval mode, without grad).
        checkpoint: file for an atomic checkpoint every ``checkpoint_every``
            iterations (model, optimiser, scheduler, RNG states, history).
        resume: continue from ``checkpoint`` if it exists, with the same result
            as an uninterrupted run.

    Returns:
        history: one dict per iteration with iter, train_loss, lr, nfe_forward,
        nfe_backward (of the model, 0 if it has no counters), seconds and, at
        evaluation points, val_loss.
    """
    n = data[0].shape[0]
    if n < 1:
        raise ValueError("training data is empty")
    if any(t.shape[0] != n for t in data):
        raise ValueError(f"data tensors disagree on N: {[t.shape[0] for t in data]}")
    world = distributed.current()
    batch = min(config.batch_size, n)
    distributed.per_rank_batch(batch, world)  # refuses a batch that does not share out
    shard = world.rows(batch)
    opt = make_optimizer(model.parameters(), config)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=list(config.lr_milestones), gamma=config.lr_gamma
    )
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        state = load_checkpoint(checkpoint)
        if state["config"] != asdict(config):
            raise ValueError(
                f"checkpoint {checkpoint} was written with config {state['config']}, "
                f"not {asdict(config)}; use a fresh output directory or the same settings"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["iter"]

    def save(it: int) -> None:
        # Nothing in the checkpoint belongs to a rank (batches and noise come from
        # the config's seed), so a run resumes on any number of processes.
        if checkpoint is not None and world.main:
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "batch_rng": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "iter": it,
                    "config": asdict(config),
                },
                checkpoint,
            )

    masked = has_masks(model)
    # Under torchrun the objective is DDP-wrapped (gradients averaged over ranks).
    objective = distributed.data_parallel(model, loss_fn)
    model.train()
    bar = tqdm(
        range(start, config.iters),
        initial=start,
        total=config.iters,
        disable=not progress or not world.main,
        desc=desc,
        dynamic_ncols=True,
        leave=False,
    )
    for it in bar:
        t0 = time.perf_counter()
        # Every rank draws the same global batch and keeps its rows of it; the
        # noise of a row depends on (seed, step) and the row, not on the rank.
        idx = torch.randint(0, n, (batch,), generator=gen)[shard]
        with per_row_noise(mix_seed(config.seed, it), shard, batch):
            loss = objective(*(t[idx] for t in data))
        # Every rank sees every rank's loss before the backward: a rank that
        # stopped alone would leave the others waiting in DDP's all-reduce.
        losses = distributed.gather([loss.item()])[:, 0]
        if not bool(torch.isfinite(losses).all()):
            bad = [r for r in range(world.size) if not math.isfinite(losses[r])]
            where = f" on rank(s) {', '.join(map(str, bad))}" if world.size > 1 else ""
            raise FloatingPointError(
                f"training loss became {losses[bad[0]].item()} at iteration {it + 1}{where}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masked:
            mask_gradients_(model)
        nfe = (float(getattr(model, "nfe_forward", 0)), float(getattr(model, "nfe_backward", 0)))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        if masked:
            # Adam's moments and decoupled weight decay could still nudge a
            # pruned weight off zero by rounding; re-applying keeps it exact.
            apply_masks_(model)
        row = _step_row(it, losses, lr, nfe, time.perf_counter() - t0, world)
        if evaluate is not None and ((it + 1) % config.eval_every == 0 or it + 1 == config.iters):
            model.eval()
            with torch.no_grad():
                row["val_loss"] = float(evaluate(model))
            model.train()
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", nfe=int(row["nfe_forward"]))
        if (it + 1) % config.checkpoint_every == 0 or it + 1 == config.iters:
            save(it + 1)
    model.eval()
    return history


def _step_row(
    it: int, losses: torch.Tensor, lr: float, nfe: tuple[float, float], seconds: float,
    world: distributed.World,
) -> dict[str, float]:
    """One history row from every rank's loss [W]; over several ranks the loss is the
    global batch's (the mean of the ranks' equal shards), NFE and seconds the ranks'
    mean with their max beside."""
    row = {"iter": it + 1, "train_loss": float(losses.mean()), "lr": lr,
           "nfe_forward": nfe[0], "nfe_backward": nfe[1], "seconds": seconds}
    if world.size > 1:
        g = distributed.gather([*nfe, seconds])
        for i, key in enumerate(("nfe_forward", "nfe_backward", "seconds")):
            row[key] = float(g[:, i].mean())
            row[f"{key}_max"] = float(g[:, i].max())
    return row


def density_loss(flow: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean NLL in nats of batch[0] under ``flow``."""
    return nll_nats(flow.log_prob(batch[0]))


def train_density(
    flow: Flow,
    train_x: torch.Tensor,
    config: TrainConfig,
    val_x: torch.Tensor | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``flow`` by maximum likelihood on minibatches of train_x [N, ...].

    Validation (when val_x is given) is the exact-trace NLL. See ``fit`` for
    checkpoints and the returned history (train_loss and val_loss in nats).
    """
    evaluate = None if val_x is None else (lambda m: evaluate_nll(m, val_x))
    return fit(
        flow,
        density_loss,
        (train_x,),
        config,
        evaluate=evaluate,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
    )
