"""No per-step traffic between host and GPU in the loop, checked without a GPU.

A blocking device->host read (`.item()`, `bool(t)`, `.cpu()`) or a host->device copy stalls the
CPU until the GPU has drained its queue, so it serialises kernel launches with GPU work. Here the
`meta` device stands in for the GPU: every tensor of the pipeline lives there (shapes, no data),
and a dispatch mode records each op that reads a meta value on the host, or that brings a CPU
tensor (other than a 0-dim scalar operand, which CUDA kernels take by value) onto the device.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from sdstream.core.loop import denoise
from sdstream.core.preview import Previewer
from sdstream.inputs import load_inputs
from sdstream.record.attention import AttentionMaps, prompts_of
from sdstream.record.orchestrator import hooks_for, size_of
from sdstream.record.sinks import Measures, NanCheck, RunInfo, Step
from sdstream.request import GenerationRequest

aten = torch.ops.aten
READS = {aten.item.default, aten._local_scalar_dense.default, aten.is_nonzero.default}
COPIES = {aten._to_copy.default, aten.copy_.default, aten.to.dtype_layout, aten.to.device, aten.to.dtype, aten.to.other}


class Traffic(TorchDispatchMode):
    """Records host<->device traffic, with `meta` as the device."""

    def __init__(self):
        super().__init__()
        self.log: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func in READS and tensors[0].is_meta:  # a meta tensor has no value: answer as a GPU would, after a sync
            self.log.append(f"read {func}")
            return False if tensors[0].dtype == torch.bool else 1
        out = func(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if any(o.is_meta for o in outs) and any(not t.is_meta and (t.dim() or func in COPIES) for t in tensors):
            self.log.append(f"upload {func}")
        if any(not o.is_meta for o in outs) and any(t.is_meta for t in tensors):
            self.log.append(f"download {func}")
        return out


@pytest.fixture(scope="module")
def on_meta(tiny):
    return copy.deepcopy(tiny).to("meta")


def loop(pipe, req):
    """The loop with the request's hooks, as the orchestrator drives it."""
    inputs = load_inputs(req)
    return denoise(pipe, req, *size_of(pipe, req, inputs), hooks_for(pipe, req, inputs))


class HeldFolder:
    """The run folder, for --attention's sink: what it is handed stays on the device (the writer's copy is its own)."""

    def __init__(self):
        self.names: list[str] = []

    def annotate(self, key, value) -> None: ...

    def write(self, name, payload, encode, step=0) -> None:
        assert all(t.is_meta for t in (payload.values() if isinstance(payload, dict) else [payload]))
        self.names.append(name)


def traffic_per_step(pipe, **kw) -> tuple[list[str], list[list[str]], list]:
    """(traffic before the first step, traffic of each later step, the events), with the per-step work of the
    sinks that see tensors on every step: the NaN check, the measures, the state kept to continue from, the
    tensors --save-tensors keeps (cast on the device), the shared event dictionary, and the cross-attention maps
    of --attention (its processors on the UNet, the maps merged into words, the heat maps over a frame)."""
    req = GenerationRequest(model="tiny", steps=6, seed=1, prompt="a red circle", **kw).validated()
    traffic, marks, events, nan_check, measures = Traffic(), [], [], NanCheck(), Measures()
    nan_check.flags, nan_check.first = [], req.first_step
    measures.start(None)
    folder = HeldFolder()
    attention = AttentionMaps(pipe.unet, folder, prompts_of(pipe.tokenizer, [(1, req.prompt)], None),
                              pipe.tokenizer.model_max_length, pipe._execution_device, (16, 16))
    picture = torch.zeros(32, 32, 3, dtype=torch.uint8, device="meta")  # a frame step's preview
    with traffic, attention.recording():
        attention.start(RunInfo(req, None, "meta", "fp32", 32, 32, req.first_step, req.total_steps, "vae"))
        for event in loop(pipe, req):
            for sink in (nan_check, measures):
                sink.step(Step(event))
            attention.step(Step(event, picture))
            event.state()
            [t.to(torch.float16) for t in (event.latents, event.denoised, event.eps, event.eps_cond)]
            Step(event).to_dict()
            marks.append(len(traffic.log))
            events.append(event)
    assert len(folder.names) == 3 * len(events)  # each step: its maps, and the heat maps of red and circle
    log = traffic.log
    return log[: marks[0]], [log[a:b] for a, b in pairwise(marks)], events


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++-2m", "pndm", "lms"])
def test_steps_make_no_host_device_traffic(on_meta, scheduler):
    setup, steps, events = traffic_per_step(on_meta, scheduler=scheduler)
    assert events[-1].latents.is_meta and events[-1].denoised.is_meta  # the run did happen on the "GPU"
    assert setup and steps == [[]] * len(steps), steps  # uploads (token ids, noise, timesteps) happen once, up front


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++-2m", "pndm", "lms"])
def test_img2img_steps_make_no_host_device_traffic(on_meta, scheduler, tmp_path):
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "init.png")
    _, steps, _ = traffic_per_step(on_meta, scheduler=scheduler, init_image=str(tmp_path / "init.png"), strength=0.8)
    assert steps == [[]] * len(steps), steps


def test_injection_uploads_its_noise_once(on_meta):
    _, steps, events = traffic_per_step(on_meta, mask="circle", inject_at_step=(3,))
    assert [len(s) for s in steps] == [1 if e.injected else 0 for e in events[1:]]  # CPU noise, for reproducibility


@pytest.mark.parametrize("mode", ["approx", "vae"])
def test_previews_stay_on_the_device(on_meta, mode):
    req = GenerationRequest(model="tiny", steps=2, seed=1, prompt="a red circle").validated()
    *_, last = loop(on_meta, req)
    previewer, traffic = Previewer(on_meta, mode, "x0"), Traffic()
    with traffic:
        picture = previewer(last)
    assert picture.is_meta and picture.dtype == torch.uint8 and traffic.log == []
