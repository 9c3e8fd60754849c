"""A batch split over the processes of `accelerate launch` (or torchrun): each runs its share of the lines on
its own device; the main process gathers the results from the run folders."""

from __future__ import annotations

import os

from ..errors import BadInput

_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # as accelerate reads


def distributed() -> bool:
    """Started by accelerate launch / torchrun / mpirun with more than one process?"""
    for name in _WORLD_SIZE_VARS:
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def is_main_process() -> bool:
    """Rank 0 (or no launcher), from the environment alone: usable before PartialState exists."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "0").strip() not in ("", "0"):
            return False
    return True


def distributed_state():
    if not distributed():
        return None
    import torch
    from accelerate import PartialState

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if gpus and local > gpus:  # accelerate gives process i the GPU cuda:i
        raise BadInput(f"{local} processes on this machine but {gpus} CUDA GPU(s): one process per GPU, "
                       f"e.g. accelerate launch --num_processes {gpus} -m sdstream batch ...")
    # Without CUDA, PartialState only joins the other processes (gloo) when told it runs on CPU.
    return PartialState(cpu=not gpus)


def from_main(state, value):
    """VALUE as the main process has it, in every process."""
    if state is None:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def process_device(state) -> str | None:
    """The device this process should use for requests that say 'auto': PartialState's."""
    if state is None:
        return None
    device = state.device
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type if device.type in ("cpu", "mps") else None
