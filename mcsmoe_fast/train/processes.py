"""What training with more than one process (`accelerate launch`, `torchrun`: distributed data parallel) needs
besides one process's loop: N processes train on global batches of N x batch_size, each on its own part, with the
gradients averaged and the losses those of the global batch (losses.py, `across`); the schedule still advances
once per optimizer step; a resume continues on as many processes
as the run was trained by; each process keeps its own random state.

On a CPU machine accelerate joins a torchrun launch only with ACCELERATE_USE_CPU=true (`accelerate launch --cpu
--num_processes N` starts one process): a launch it did not join is refused (check_world), since each process would
train alone on all the data and write the same output_dir.
"""
from __future__ import annotations

import os

import torch

PROCESSES_KEY = "num_processes"  # the progress record's entry: how many processes trained the run


def accelerator_options() -> dict:
    """Accelerator arguments: the scheduler stepped by the loop, once per optimizer step (accelerate's own stepping
    runs it N times a step under N processes, sized for per-process batches of an unsharded loader: warm-up and decay
    ended at 1/N of the run); DDP told that some parameters get no gradient in a step (transformers' per-expert MoE
    blocks run only the experts their tokens reach: an expert no token of a process's part reached stopped DDP)."""
    from accelerate.utils import DistributedDataParallelKwargs

    return dict(step_scheduler_with_optimizer=False,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def check_world(accelerator) -> None:
    """ValueError when the launcher started more processes (WORLD_SIZE) than accelerate joined."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes != world:
        raise ValueError(f"WORLD_SIZE={world}, but accelerate runs {accelerator.num_processes} process(es) on "
                         f"{accelerator.device}: each process would train alone on all the data and write the same "
                         "output_dir. On CPUs set ACCELERATE_USE_CPU=true for torchrun to train on "
                         f"{world} processes")


def check_resumed_processes(record: dict, accelerator, latest) -> None:
    """ValueError when the run in `latest` (its progress record) was trained by another number of processes: the data
    order skipped on resume and the global batch are counted in the saved run's processes. Runs saved before the
    record kept the count are not checked (it is not known)."""
    saved = record.get(PROCESSES_KEY)
    if saved is not None and saved != accelerator.num_processes:
        raise ValueError(f"resume: {latest} holds a run trained by {saved} process(es), {accelerator.num_processes} "
                         f"now: resume it on {saved} (batch_size is per process: the global batch, and the examples "
                         "already trained, depend on the process count)")


def check_batches_per_epoch(loader, examples: int, batch_size: int, processes: int) -> None:
    """ValueError when every process's part of the data holds no whole batch."""
    if len(loader) == 0:
        raise ValueError(f"train_data has {examples} examples, fewer than one global batch of "
                         f"{batch_size * processes} (batch_size {batch_size} x {processes} processes)")


class Across:
    """Sums over the processes that share a global batch (losses.py's `across`)."""

    def __init__(self, accelerator):
        self.accelerator, self.processes = accelerator, accelerator.num_processes

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, "sum")


def across(accelerator) -> Across | None:
    """Across for N > 1 processes, None for one (the losses as one process computes them)."""
    return Across(accelerator) if accelerator.num_processes > 1 else None


def mean_over_processes(accelerator, loss: torch.Tensor) -> float:
    """The loss averaged over the processes (each computed it on its part of the global batch)."""
    if accelerator.num_processes == 1:
        return loss.item()
    return accelerator.reduce(loss.detach().float(), "mean").item()


def rank_rng_states(accelerator) -> dict[str, torch.Tensor]:
    """Every process's random state, gathered (all processes call it): {"rng.torch.rank.R": state,
    "rng.cuda.rank.R": its device's state}; dropout draws differ between processes (batches of other shapes), so a
    resume gives each process its own. Empty under one process (the state file's rng.torch is that process's)."""
    if accelerator.num_processes == 1:
        return {}
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    out = {}
    for kind, state in states.items():
        gathered = accelerator.gather(state[None].to(accelerator.device)).cpu()
        out.update({f"rng.{kind}.rank.{r}": gathered[r].contiguous() for r in range(gathered.shape[0])})
    return out


def restore_rank_rng(tensors: dict, rank: int) -> bool:
    """Set this process's own saved random state (rank_rng_states); False when the run was saved without one."""
    if f"rng.torch.rank.{rank}" not in tensors:
        return False
    torch.set_rng_state(tensors[f"rng.torch.rank.{rank}"])
    if f"rng.cuda.rank.{rank}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank.{rank}"])
    return True
