"""Model families: what differs between SD 1.x/2.x, SDXL, SD3 and FLUX, behind one small interface (base.Family),
so that the loop, the interventions, the frames and the trajectory work for every family with no family-specific
code outside its module. Adding a family is one module here and one entry below.

The family comes from the pipeline's class (model_index.json's `_class_name`), so its traits are known before
anything loads; this module is pure data (it imports no torch), the adapters of loaded pipelines are in the
family modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedulers import SCHEDULERS


@dataclass(frozen=True)
class Traits:
    """What the request checks need of a family before anything loads."""

    name: str
    module: str  # the module here, and the class in it, that adapts a loaded pipeline of the family
    adapter: str
    flow: bool = False  # flow matching (SD3, FLUX): x_next = x + (sigma_next - sigma) v, x0 = x - sigma v
    image_prompt: bool = False  # whether a photo's CLIP features can stand for the prompt (SD 1.x/2.x)
    negative_prompt: bool = True  # guidance contrasts the prompt with a negative one (FLUX's is embedded: no)
    size_factor: int = 1  # sizes are multiples of the VAE factor times this (SD3 and FLUX take 2x2 patches: 2)
    default_taesd: str = "madebyollin/taesd"
    steps: int = 20  # what --steps and --guidance are when not given (the family's usual; an alias may differ)
    guidance: float = 7.5

    @property
    def schedulers(self) -> tuple[str, ...]:
        """The --scheduler names that make sense for it: flow-matching ones, or DDPM-type ones."""
        return tuple(name for name, s in SCHEDULERS.items() if s.flow == self.flow)

    @property
    def default_scheduler(self) -> str:
        """What --scheduler auto means for it: its diffusers pipeline's own."""
        return "flow-euler" if self.flow else "ddim"

    def scheduler(self, asked: str) -> str:
        """The scheduler a run of this family uses when --scheduler ASKED."""
        return self.default_scheduler if asked == "auto" else asked


SD = Traits("SD 1.x/2.x", "sd", "StableDiffusion", image_prompt=True)
SDXL = Traits("SDXL", "sdxl", "StableDiffusionXL", default_taesd="madebyollin/taesdxl", steps=30, guidance=5.0)
SD3 = Traits("SD3", "sd3", "StableDiffusion3", flow=True, size_factor=2, default_taesd="madebyollin/taesd3", steps=28,
             guidance=7.0)
FLUX = Traits("FLUX", "flux", "Flux", flow=True, negative_prompt=False, size_factor=2,
              default_taesd="madebyollin/taef1", steps=28,
              guidance=3.5)  # FLUX.1 [dev]'s embedded guidance; [schnell] (alias flux-schnell) takes 4 steps, none

# the pipeline class, as model_index.json names it -> its family
FAMILIES = {
    "StableDiffusionPipeline": SD,
    "StableDiffusionImg2ImgPipeline": SD,
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusionXLImg2ImgPipeline": SDXL,
    "StableDiffusion3Pipeline": SD3,
    "StableDiffusion3Img2ImgPipeline": SD3,
    "FluxPipeline": FLUX,
    "FluxImg2ImgPipeline": FLUX,
}


def traits_of(pipeline_class: str) -> Traits:
    """The family of a diffusers pipeline class name; BadInput for one sdstream does not run."""
    from ...errors import BadInput

    if pipeline_class not in FAMILIES:
        known = ", ".join(dict.fromkeys(t.name for t in FAMILIES.values()))
        raise BadInput(f"a {pipeline_class} is not a model family sdstream runs ({known})")
    return FAMILIES[pipeline_class]


def family_of(pipe):
    """The family adapter (base.Family) of a loaded pipeline, cached on it."""
    import importlib

    if getattr(pipe, "sdstream_family", None) is None:
        traits = traits_of(type(pipe).__name__)
        adapter = getattr(importlib.import_module(f"{__name__}.{traits.module}"), traits.adapter)
        pipe.sdstream_family = adapter(pipe, traits)
    return pipe.sdstream_family
