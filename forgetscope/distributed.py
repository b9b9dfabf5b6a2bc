"""Several processes (``accelerate launch``, ``torchrun``): which one this is, and the few
collective steps forgetscope takes.

Under N processes every one trains (DDP) and every one scores its share of each snapshot's
requests (lm-eval splits them by rank; rank 0 gathers the results and writes everything). Work
that every process needs but only one should do (converting a model, sampling the drift probe or
the replay buffer, all cached on disk) runs on rank 0 first; the others then read the cache.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import TypeVar

import torch

from forgetscope.errors import UserError

T = TypeVar("T")


def launched() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> None:
    """Join the process group now (accelerate's state; gloo on CPUs, NCCL on GPUs) when launched
    with several processes, so that the steps before training can wait for each other. FSDP is
    refused: snapshots are scored from whole weights in each process, which sharded ones are not."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise UserError(
            "FSDP is not supported yet (snapshots are scored from whole weights in every process); "
            "launch with --multi_gpu (DDP) and a model that fits one GPU, or use method: lora"
        )
    if launched() > 1:
        # Imported before the group exists: its functions take ``group.WORLD`` as a default argument,
        # evaluated at import, and transformers imports it while loading a tokenizer. Bound to the
        # group, the defaults would keep it, and gloo's threads, alive after ``finish`` until the
        # interpreter exits, where a thread still releasing a tensor aborts the process (SIGABRT).
        import torch.distributed.nn  # noqa: F401
        from accelerate import PartialState

        PartialState()


def finish() -> None:
    """Leave the process group at the end of a command that succeeded, as PyTorch asks of every
    process (its docs, "Shutdown"). Not after an error: the other processes may still be inside a
    collective step, which leaving would hang.

    The group's threads stop when its last reference goes, and may then still be releasing the
    tensors of a finished collective, which takes the GIL. Dropped here, the last reference lets
    them (the binding releases the GIL). Dropped by a DDP model's reducer, which keeps the GIL, it
    can hang; left to the interpreter's exit, it can abort ("terminate called without an active
    exception", pytorch/pytorch#190489). So the finished command's models, unreachable but perhaps
    in reference cycles, are collected first, while torch's registry still holds the group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def active() -> bool:
    """Whether several processes take part in a process group."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank() -> int:
    """This process's rank (0 alone, or before the group exists: the launcher's ``RANK``)."""
    return torch.distributed.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes in the group (1 alone)."""
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        torch.distributed.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value``, on every process (any picklable object)."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (and fills the caches), the others after it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
