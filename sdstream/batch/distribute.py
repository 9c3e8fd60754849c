"""A batch split over the processes of `accelerate launch` (or torchrun): each runs its share of the lines on
its own device; the main process gathers the results from the run folders. The processes may be on several
machines (accelerate launch --num_machines N --machine_rank R ...): the main one is global rank 0, each process
takes the device of its local rank, and --out must be one folder that all of them see (checked: shared_out)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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


def _several_machines() -> bool:
    """Whether the processes may span machines: more of them in all than on this one (or unknown here)."""
    world = next((int(os.environ[v]) for v in _WORLD_SIZE_VARS if os.environ.get(v, "").isdigit()), 1)
    local = next((os.environ[v] for v in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
                  if os.environ.get(v, "").isdigit()), None)
    return local is None or int(local) < world


def shared_out(state, out: Path) -> None:
    """On several machines, every process must see OUT as one folder (the main process sums up the run folders
    the others write): the main one writes a token into it, every process reads it back. BadInput in every
    process if one does not."""
    if state is None or not _several_machines():
        return
    import secrets

    from accelerate.utils import gather_object

    token = from_main(state, secrets.token_hex(8))
    path = Path(out) / f".sdstream-shared-{token}"
    if state.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    state.wait_for_everyone()
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    views = gather_object([(state.process_index, socket.gethostname(), seen)])
    if state.is_main_process:
        path.unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, ok in views if not ok]
    if blind:
        import torch.distributed as dist

        state.wait_for_everyone()
        dist.destroy_process_group()  # every process leaves together, none killed by the others' going
        rank, host = blind[0]
        raise BadInput(f"--out {str(out)!r}: process {rank} (on {host}) does not see the folder the main process "
                       f"writes; with accelerate launch on several machines --out must be a folder on a file system "
                       f"they share, at the same path on each")
