"""torch.distributed for fastdiff: set-up from torchrun's environment, rank helpers, barrier.

fastdiff scales out on PyTorch's own engine.  ``torchrun`` (``python -m
torch.distributed.run``) starts one process per device and exports ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; `init` joins
the process group from them (``init_method="env://"``):

* CUDA: backend NCCL, one GPU per process, ``cuda:LOCAL_RANK``;
* CPU:  backend gloo.

Outside torchrun every helper answers for a single process (rank 0 of 1) and
`init`, `barrier` and `cleanup` do nothing, so the same code runs in both cases.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True in a process started by torchrun (its environment variables are set)."""
    return all(name in os.environ for name in _ENV)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """This process's index on its node: its GPU under torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device(requested: str | torch.device | None = None) -> torch.device:
    """The device of this process: ``requested`` (default: CUDA when available), on GPU ``LOCAL_RANK``.

    A bare "cuda" under torchrun means this process's own GPU, so every rank may be
    given the same ``--device cuda``.
    """
    dev = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None and launched():
        dev = torch.device("cuda", local_rank())
    return dev


def init(requested_device: str | torch.device | None = None, timeout_minutes: float = 30) -> torch.device:
    """Join torchrun's process group (no-op outside torchrun); returns this process's device."""
    dev = device(requested_device)
    if not launched() or initialized():
        return dev
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and the object collectives use the current device
    dist.init_process_group(
        backend, init_method="env://", timeout=datetime.timedelta(minutes=timeout_minutes),
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )  # fmt: skip
    return dev


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if initialized() and world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if initialized():
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, …]`` (``[obj]`` for a single process)."""
    if not initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``x`` (in place; ``x`` itself for a single process)."""
    if initialized() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself for a single process).

    For a decision one rank makes for all, such as the checkpoint every rank resumes from."""
    if not initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
