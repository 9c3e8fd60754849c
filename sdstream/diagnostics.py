"""System, GPU and model facts as plain data (dicts of str/int/float/bool/None).

The CLI renders these; a server can return them as JSON unchanged. Gathering a fact never
raises for a broken driver or a missing library: the fact reads None (or an error string),
because a diagnostics command is what people run when something is already wrong.
Heavy imports live inside functions: importing this module does not import torch.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

from . import __version__

LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "safetensors", "numpy", "pillow")
CHECK_STEPS = 5


def collect() -> dict:
    """Everything `sdstream diagnostics` reports without loading a model."""
    return {
        "sdstream": __version__,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "description": platform.platform()},
        "libraries": {name: _version(name) for name in LIBRARIES},
        "cpu": cpu(),
        "cuda": cuda(),
        "mps": mps(),
        "choice": choice(),
        "huggingface": huggingface(),
    }


def _version(dist: str) -> str | None:
    # From package metadata: no import, and a missing library reads None instead of failing.
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu() -> dict:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total, available = _ram()
    return {"processor": platform.processor() or None, "logical_cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "ram_total_bytes": total, "ram_available_bytes": available}


def _ram() -> tuple[int | None, int | None]:
    try:  # psutil is not a dependency, but it knows every OS
        import psutil

        mem = psutil.virtual_memory()
        return mem.total, mem.available
    except ImportError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (AttributeError, ValueError, OSError):
        return None, None
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page  # Linux only; free, not counting reclaimable cache
    except (ValueError, OSError):
        available = None
    return total, available


def cuda() -> dict:
    """CUDA (or ROCm) build, driver and every visible GPU with its memory."""
    import torch

    # A driver too old for this torch build shows up as a warning from is_available(): keep it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    info = {
        "available": available,
        "torch_cuda": torch.version.cuda,  # None on CPU-only builds
        "torch_hip": getattr(torch.version, "hip", None),
        "cudnn": torch.backends.cudnn.version() if available else None,
        "driver": _nvidia_driver() if available and torch.version.cuda else None,
        "warnings": [str(w.message).strip() for w in caught],
        "devices": [],
    }
    for i in range(torch.cuda.device_count() if available else 0):
        info["devices"].append(_gpu(i))
    return info


def _gpu(i: int) -> dict:
    import torch

    gpu: dict = {"index": i, "device": f"cuda:{i}"}
    try:
        p = torch.cuda.get_device_properties(i)
        gpu.update(name=p.name, compute_capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   total_memory_bytes=p.total_memory)
        free, _ = torch.cuda.mem_get_info(i)  # what every process together leaves free
        gpu.update(free_memory_bytes=free, allocated_bytes=torch.cuda.memory_allocated(i),
                   reserved_bytes=torch.cuda.memory_reserved(i))
    except Exception as e:  # a GPU in a bad state: report it, keep going
        gpu["error"] = f"{type(e).__name__}: {e}"
    return gpu


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver version: from /proc on Linux, else from nvidia-smi, else None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+([\d.]+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        first = out.stdout.strip().splitlines()
        return first[0].strip() if out.returncode == 0 and first else None
    except (OSError, subprocess.SubprocessError):
        return None


def mps() -> dict:
    import torch

    return {"built": torch.backends.mps.is_built(), "available": torch.backends.mps.is_available()}


def choice() -> dict:
    """What `--device auto --dtype auto` and the default --model resolve to here."""
    from .models.loader import dtype_name, resolve_device, resolve_dtype
    from .models.registry import default_model

    device = resolve_device("auto")
    return {"device": device, "dtype": dtype_name(resolve_dtype("auto", device)), "model": default_model()}


def huggingface() -> dict:
    """Where models are cached and whether the Hub may be reached. The token itself is never read out."""
    from huggingface_hub import constants

    return {
        "hub_cache": constants.HF_HUB_CACHE,
        "hf_home": constants.HF_HOME,
        "offline": bool(constants.HF_HUB_OFFLINE),
        "env": {name: os.environ.get(name) for name in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
                                                        "TRANSFORMERS_OFFLINE", "SDSTREAM_MODEL")},
        "hf_token_set": bool(os.environ.get("HF_TOKEN")),
    }


def check() -> dict:
    """Run `tiny` for a few steps on the chosen device through the orchestrator, as every run goes, and time them.

    ok is True when every step ran and the latents and the final picture are finite (an fp16 VAE that
    overflows to NaN is the classic failure this catches: the run's own NaN check and VAE retry report it).
    """
    from .models.loader import dtype_name, quiet_libraries, resolve_device, resolve_dtype

    quiet_libraries()
    from .record.orchestrator import run
    from .record.sinks import Sink
    from .request import GenerationRequest

    device = resolve_device("auto")
    result = {"ok": False, "model": "tiny", "device": device, "dtype": dtype_name(resolve_dtype("auto", device)),
              "steps": CHECK_STEPS, "load_seconds": None, "step_seconds": [], "steps_per_second": None,
              "finite": None, "recoveries": [], "error": None}

    class Timer(Sink):  # wall time between steps, after the device finished: GPU work is queued asynchronously
        def start(self, info):
            self.last = time.perf_counter()

        def step(self, step):
            _sync(device)
            now = time.perf_counter()
            result["step_seconds"].append(round(now - self.last, 5))
            self.last = now

    try:
        req = GenerationRequest(prompt="a red circle", model="tiny", steps=CHECK_STEPS, seed=0, device=device,
                                preview="none")
        done = run(req, [Timer()])
        result.update(load_seconds=done.info.timings["load"], recoveries=done.info.recoveries, finite=True, ok=True)
        # Speed over the steps after the first: the first also pays for prompt encoding and warm-up.
        timed = result["step_seconds"][1:] or result["step_seconds"]
        result["steps_per_second"] = round(len(timed) / max(sum(timed), 1e-9), 2)
    except Exception as e:  # the point of --check is to report this, not to crash on it
        result["finite"] = False if "NaN" in str(e) else None
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def placement(model: str) -> dict:
    """Load MODEL on the chosen device and say where each component sits, with its parameter count.

    Raises the loader's BadInput / SdstreamError (unknown name, not on disk while offline, …).
    """
    from .models.loader import dtype_name, load_pipeline, quiet_libraries, resolve_device, resolve_dtype
    from .models.registry import check_available
    from .request import GenerationRequest

    source = check_available(GenerationRequest(model=model))  # before anything heavy is imported
    quiet_libraries()
    import torch

    device = resolve_device("auto")
    t0 = time.perf_counter()
    pipe = load_pipeline(source, device, resolve_dtype("auto", device))
    seconds = time.perf_counter() - t0
    components = []
    for name, part in pipe.components.items():
        if part is None:
            continue
        entry = {"name": name, "class": type(part).__name__, "device": None, "dtype": None, "parameters": None}
        if isinstance(part, torch.nn.Module):
            params = list(part.parameters())
            entry["parameters"] = sum(p.numel() for p in params)
            if params:
                entry.update(device=str(params[0].device), dtype=dtype_name(params[0].dtype))
        components.append(entry)
    return {
        "name": source.name, "kind": source.kind, "location": source.location, "load_seconds": round(seconds, 4),
        "components": components,
        "parameters": sum(c["parameters"] or 0 for c in components),
    }


def models() -> list[dict]:
    """Every alias: where it comes from, whether it is on disk (huggingface_hub's cache scan), where and how big."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .models.registry import ALIASES, default_model, hub_snapshot, tiny_path

    try:
        cached = {repo.repo_id: repo for repo in scan_cache_dir().repos if repo.repo_type == "model"}
    except CacheNotFound:
        cached = {}
    default = default_model()
    rows = []
    for alias, (repo, family, description) in ALIASES.items():
        path = tiny_path() if alias == "tiny" else hub_snapshot(repo)
        size = _size(path) if alias == "tiny" else (cached[repo].size_on_disk if repo in cached and path else None)
        rows.append({
            "alias": alias, "source": repo, "family": family, "description": description,
            "on_disk": path is not None, "path": str(path) if path else None, "size_bytes": size,
            "default": alias == default,
        })
    return rows


def _size(folder: Path) -> int:
    """Bytes of the regular files under FOLDER."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
