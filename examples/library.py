"""Use sdstream from Python: watch every step with a sink, get the final image, write and read a run folder.

    HF_HUB_OFFLINE=1 python examples/library.py
"""

import sdstream
from sdstream import GenerationRequest

request = GenerationRequest(prompt="a red circle on a blue background", model="tiny", steps=10, seed=1,
                            mask="edges", inject_at_step=(4,))


class Watch(sdstream.Sink):
    """Every step's event carries the latent and the model's clean estimate (x0) as tensors."""

    def step(self, step):
        ev = step.event
        note = "  <- noise injected" if ev.injected else ""
        print(f"step {ev.step:2d}/{ev.total_steps}  t={ev.timestep:4d}  "
              f"latent std {ev.latents.std():.3f}  x0 std {ev.denoised.std():.3f}{note}")


# 1. The final image, no files: a PIL image.
image = sdstream.generate(request, [Watch()])
print("final image", image.size)

# 2. Into a run folder (frames/, final.png, run.json), as `sdstream generate` does, and read back.
result = sdstream.run(request, "outputs/library-example", overwrite=True)
run = sdstream.open_run(result.run_dir)
print("wrote", result.image_path, "·", run.manifest["status"], "· frames of steps", run.steps)
