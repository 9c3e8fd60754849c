"""A run that continues another: a branch (`sdstream branch RUN --at-step K`: a new folder, another prompt,
guidance, noise or seed from step K on) or a resumed run (`sdstream resume RUN`: the same folder, after the
step it stopped at). Worked out before anything loads: the parent's request, the step, the saved state.

From a saved state after step K - 1 only steps K... are computed; without one the steps before K are computed
again exactly as the parent computed them (replayed, shown to no sink), and the changes take effect at K.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import BadInput
from ..request import OPTIONS, GenerationRequest, from_values
from .rundir import open_run

# What a branch may change; everything else it takes from its parent (they share the steps before K).
MAY_CHANGE = {"prompt", "negative_prompt", "guidance", "prompt_at", "mask", "inject_at_step", "noise_strength", "seed"}
# ... and how its own output looks, which the trajectory does not depend on
OUTPUT = {"preview", "frame_source", "taesd", "frames_every", "frame_size", "frame_format", "save_tensors",
          "tensor_dtype", "save_state", "stop_at_step", "parent", "at_step", "device", "compile", "cpu_offload",
          "vae_tiling", "attention_slicing", "attention", "attention_words"}


@dataclass
class Continuation:
    parent_dir: Path
    parent: GenerationRequest  # the parent's request, validated: the steps before AT are its
    at: int  # the first step this run computes as itself
    state: Path | None  # the state saved after step AT - 1 (None: the steps before AT are replayed)
    frames: list  # the parent's frame entries before AT (a branch lists them as its own)
    in_place: bool = False  # resume: the same folder


def request_of(run) -> GenerationRequest:
    """The validated request a run folder's run.json records (fields a newer sdstream added default)."""
    kept = run.manifest.get("request") or {}
    known = {f.name for f in fields(GenerationRequest)}
    try:
        return from_values({k: v for k, v in kept.items() if k in known}).validated()
    except BadInput as e:
        raise BadInput(f"{str(run.dir)!r}: its run.json holds a request this sdstream can't run again ({e})") from None


def state_file(run, step: int) -> Path | None:
    path = run.dir / "state" / f"step-{step:04d}.safetensors"
    return path if f"state/{path.name}" in set(run.manifest.get("files") or ()) and path.is_file() else None


def branch_of(req) -> Continuation:
    """The Continuation of REQ (which names a parent and a step), or BadInput saying why it can't be one."""
    parent_run = open_run(req.parent)
    if parent_run.status == "running":
        raise BadInput(f"--parent {req.parent!r} is being written by a run right now; branch it once it ends")
    parent = request_of(parent_run)
    for name in OPTIONS:
        if name in MAY_CHANGE or name in OUTPUT or getattr(req, name) == getattr(parent, name):
            continue
        if name == "scheduler" and req.scheduler == "auto":  # the model's own, as the parent's was decided
            continue
        opt = OPTIONS[name]
        raise BadInput(f"{opt.flag}: a branch continues its parent and keeps its {opt.flag} "
                       f"({getattr(parent, name)!r}); a branch changes only "
                       + ", ".join(OPTIONS[n].flag for n in OPTIONS if n in MAY_CHANGE))
    first, total, at = parent.first_step, parent.total_steps, req.at_step
    if not first <= at <= total:
        raise BadInput(f"--at-step {at} is not allowed: give a step of the parent's run, from {first} to {total}")
    frames = [f for f in parent_run.manifest.get("frames") or () if f.get("step", 0) < at]
    return Continuation(parent_run.dir, parent, at, state_file(parent_run, at - 1) if at > first else None, frames)


def resumption_of(run_dir) -> tuple[GenerationRequest, Continuation]:
    """(the request to finish, its Continuation) for a run that stopped (--stop-at-step) or was interrupted."""
    run = open_run(run_dir)
    if run.status not in ("stopped", "interrupted", "killed"):
        raise BadInput(f"run {str(run_dir)!r} is {run.status}: only a stopped or interrupted run can be resumed")
    req = request_of(run)
    done = max([s["step"] for s in run.manifest.get("states") or ()], default=None)
    if done is None:
        raise BadInput(f"run {str(run_dir)!r} kept no state to continue from (run.json lists none)")
    finish = from_values({**{f.name: getattr(req, f.name) for f in fields(req)}, "stop_at_step": None}).validated()
    state = state_file(run, done)
    if state is None:
        raise BadInput(f"run {str(run_dir)!r}: the state of step {done} is not on disk")
    frames = [f for f in run.manifest.get("frames") or () if f.get("step", 0) <= done]
    return finish, Continuation(run.dir, finish, done + 1, state, frames, in_place=True)
