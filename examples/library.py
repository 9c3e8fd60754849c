"""Use sdstream from Python: iterate the step events yourself, or run into a folder.

    HF_HUB_OFFLINE=1 python examples/library.py
"""

from sdstream import GenerationRequest, denoise, load, run

request = GenerationRequest(prompt="a red circle on a blue background", model="tiny", steps=10, seed=1,
                            mask="edges", inject_at_step=(4,)).validated()

# 1. Step by step: every event carries the latent and the model's clean estimate (x0).
pipe = load("tiny")
for event in denoise(pipe, request):
    note = "  <- noise injected" if event.injected else ""
    print(f"step {event.step:2d}/{event.total_steps}  t={event.timestep:4d}  "
          f"latent std {event.latents.std():.3f}  x0 std {event.denoised.std():.3f}{note}")

# 2. Into a run folder (frames/, final.png, run.json), as `sdstream generate` does.
result = run(request, "outputs/library-example", overwrite=True)
print("wrote", result.image)
