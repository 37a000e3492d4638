"""Data-parallel runs under ``torchrun``: the process group, shards, and agreement checks.

``torchrun --nproc-per-node N -m flows prune ...`` starts N copies of the
command; ``init_from_env`` (called by the command line) finds torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group: gloo
on CPU, NCCL with one GPU per rank (``cuda:LOCAL_RANK``) where CUDA is
available. Without torchrun nothing is initialised and ``current()`` is a
world of one process, so every helper here is a no-op.

How a run is shared (the README's "Several processes" says it for users):

- Every rank draws the same global minibatch (one generator per cycle) and
  trains on its contiguous shard of ``batch_size / world_size`` rows
  (``per_rank_batch``); DDP averages the gradients, so a step equals the
  one-process step on the whole batch (up to the order of a sum). The
  learning rate is the preset's: the global batch and the mean loss are.
- Noise is tied to the sample's row in the global batch
  (``flows.row_noise``), so it does not depend on the number of ranks.
- Pruning runs on every rank on the same weights (broadcast from rank 0 first);
  ``check_same_on_ranks`` then compares the masks, and a difference is an error.
- Rank 0 alone writes files; the others wait at ``barrier``.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """The processes of a run: this one's ``rank`` of ``size``, and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised: bool = False  # a torch.distributed process group was joined

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (the first ranks get one more)."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)


_world = World()


def current() -> World:
    """The world this process runs in (a single process unless ``init_from_env`` joined one)."""
    return _world


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``env`` (default: os.environ) is one torchrun gives its workers."""
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_VARS)


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often torchrun restarted this job's workers (``--max-restarts``); 0 otherwise."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_from_env(timeout_s: float = 1800.0) -> World:
    """Join torchrun's process group if this process is a torchrun worker; return the world.

    gloo on CPU, NCCL where CUDA is available (then this rank's device is
    ``cuda:LOCAL_RANK``). Outside torchrun, returns the single-process world.
    """
    global _world
    if _world.initialised or not under_torchrun():
        return _world
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timeout))
    # torchrun keeps one store across --max-restarts rounds; the addresses the
    # previous round's workers left there would send a restarted group to dead
    # ports (a hang in gloo's connect), so each round joins under its own prefix.
    store = dist.PrefixStore(f"sparseflow/round{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    _world = World(rank, size, local, device, initialised=True)
    return _world


def shutdown(clean: bool = True) -> None:
    """Leave the process group (the end of a command).

    ``clean=False`` after a lost peer or a stop by torchrun: tearing down a group
    whose peers are gone can block, and torchrun's restart of the workers needs
    this process gone, so the group is dropped with the process.
    """
    global _world
    if _world.initialised and clean:
        import torch.distributed as dist

        dist.destroy_process_group()
    _world = World()


class StoppedByLauncher(RuntimeError):
    """torchrun ended this worker (SIGTERM), as it does to the others when one rank fails."""


def stop_on_sigterm() -> None:
    """Turn torchrun's SIGTERM into ``StoppedByLauncher``, so the rank ends with one line."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise StoppedByLauncher(
            "torchrun stopped this rank (SIGTERM), most likely because another rank failed"
        )

    signal.signal(signal.SIGTERM, stop)


def use_world(world: World) -> None:
    """Make ``world`` current (tests that join a process group themselves)."""
    global _world
    _world = world


def barrier() -> None:
    """Wait until every rank is here (rank 0 writes, the others wait for it)."""
    if _world.initialised:
        import torch.distributed as dist

        dist.barrier()


def gather(values: Sequence[float]) -> torch.Tensor:
    """Every rank's ``values``: a float64 [world size, len(values)] tensor on the CPU."""
    local = torch.tensor([list(values)], dtype=torch.float64)
    if not _world.initialised:
        return local
    import torch.distributed as dist

    local = local.to(_world.device)
    out = [torch.empty_like(local) for _ in range(_world.size)]
    dist.all_gather(out, local)
    return torch.cat(out).cpu()


def mean_and_max(values: Sequence[float], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{name: {"mean": over ranks, "max": over ranks}} of this rank's ``values``."""
    g = gather(values)
    return {
        n: {"mean": float(g[:, i].mean()), "max": float(g[:, i].max())}
        for i, n in enumerate(names)
    }


def broadcast_module_(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, in place."""
    if not _world.initialised:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in module.state_dict().values():
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, 0)


class RankMismatchError(RuntimeError):
    """Ranks hold different values where they must agree (the masks after a prune)."""


def check_same_on_ranks(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise on every rank unless every rank holds rank 0's ``tensors`` exactly.

    Args:
        tensors: name -> tensor, the same names and shapes on every rank.
        what: what they are, for the message ("the masks after pruning cycle 2").

    Raises:
        RankMismatchError: naming the ranks and entries that differ from rank 0's.
    """
    if not _world.initialised or _world.size == 1:
        return
    import torch.distributed as dist

    differ: list[str] = []
    for name, t in tensors.items():
        mine = t.detach().to(_world.device)
        ref = mine.clone()
        dist.broadcast(ref, 0)
        n = int((ref != mine).sum())
        if n:
            differ.append(f"{name} ({n} entries)")
    counts = gather([len(differ)])[:, 0]
    bad = [r for r in range(_world.size) if counts[r] > 0]
    if bad:
        here = f"; here (rank {_world.rank}): {', '.join(differ)}" if differ else ""
        raise RankMismatchError(
            f"{what} differ across ranks: rank(s) {', '.join(map(str, bad))} disagree with "
            f"rank 0{here}; the ranks would train different models, so the run stops"
        )


def per_rank_batch(batch_size: int, world: World | None = None) -> int:
    """The rows of a global batch of ``batch_size`` that each rank trains on.

    Raises:
        ValueError: ``batch_size`` does not divide by the number of ranks.
    """
    world = world or _world
    if batch_size % world.size:
        raise ValueError(
            f"the global batch of {batch_size} rows does not divide over {world.size} "
            f"processes; choose a train.batch_size that is a multiple of {world.size} "
            f"(--set train.batch_size=...) or another --nproc-per-node"
        )
    return batch_size // world.size


class Objective(nn.Module):
    """``loss_fn(model, batch)`` as a module, the unit DDP wraps.

    DDP synchronises gradients for what runs through its ``forward``; a flow's
    loss calls ``log_prob``, not ``forward``, so the loss itself is the forward.
    """

    def __init__(
        self, model: nn.Module,
        loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def data_parallel(
    model: nn.Module, loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
) -> nn.Module:
    """The training objective of ``model``: DDP-wrapped in a process group, else plain.

    Call it anew whenever the parameter set changes (after each prune, on the
    newly compiled model): DDP's buckets are built for one set of parameters.
    """
    objective = Objective(model, loss_fn)
    if not _world.initialised:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    ids = [_world.device.index] if _world.device.type == "cuda" else None
    # Buffers (a CNF's fixed end time, index tensors) never change in training, so no
    # per-step broadcast; torch 2.13 renamed the switch, torch 2.4 knows the old name.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(objective, device_ids=ids, **{no_sync: False})


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank died."""
    text = str(e).lower()
    signs = ("connection closed by peer", "connection reset by peer", "broken pipe",
             "connection refused", "socket closed", "nccl communicator was aborted")
    return _world.initialised and any(s in text for s in signs)
