"""Pictures of chosen steps from the tensors a run kept (--save-tensors), with another decoder than the run's.

    RUN/redecoded/<preview>/step-NNNN.png     (listed in RUN's run.json, so --overwrite may replace them)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from .continuation import request_of
from .files import atomic_write, picture_encoder
from .rundir import open_run, register_files


def redecode(run_dir, steps, preview: str = "vae", source: str = "x0", taesd: str | None = None) -> list[Path]:
    """Decode STEPS of RUN_DIR's kept tensors (x0 or latents, as SOURCE says) with PREVIEW; the written files."""
    if preview not in ("vae", "taesd", "approx"):
        raise BadInput(f"--preview {preview!r} is not one of: vae, taesd, approx")
    if source not in ("x0", "latent"):
        raise BadInput(f"--source {source!r} is not one of: x0, latent")
    run = open_run(run_dir)
    req = request_of(run)
    name = "x0" if source == "x0" else "latents"
    kept = {step: run.tensors(step) for step in steps}  # every step checked before the model loads
    missing = [step for step, tensors in kept.items() if name not in tensors]
    if missing:
        raise BadInput(f"run {str(run_dir)!r} kept no {name} of step {missing[0]} (its --save-tensors: "
                       f"{', '.join(req.save_tensors) or 'none'})")
    from ..core.families import family_of
    from ..core.preview import Previewer
    from ..models.loader import load_pipeline, quiet_libraries, resolve_device, resolve_dtype
    from ..models.registry import check_available

    quiet_libraries()
    device = resolve_device(req.device)
    pipe = load_pipeline(check_available(req), device, resolve_dtype(req.dtype, device))
    size = (run.manifest["width"], run.manifest["height"])
    decoder = Previewer(pipe, preview, "x0", taesd, size)
    folder = run.dir / "redecoded" / preview
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    encode = picture_encoder("png")
    for step, tensors in kept.items():
        latent = tensors[name][None].to(device=pipe._execution_device, dtype=family_of(pipe).dtype)
        data = encode(decoder.decode(latent).cpu())
        path = folder / f"step-{step:04d}.png"
        atomic_write(path, lambda f, data=data: f.write(data))
        written.append(path)
    register_files(run.dir, [str(p.relative_to(run.dir)) for p in written] + [f"redecoded/{preview}/", "redecoded/"])
    return written
