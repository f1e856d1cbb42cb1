"""Schedulers by name (``--scheduler``), and how many UNet steps a scheduler makes for a step count."""

from __future__ import annotations

SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler", "euler-trailing": "EulerDiscreteScheduler",
}


# Config changes a scheduler name implies: few-step distilled models (SDXL-Turbo/Lightning) sample "trailing"
# timesteps, so that their 1-4 steps start at the last training timestep.
SCHEDULER_OPTIONS = {"euler-trailing": {"timestep_spacing": "trailing"}}


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for ``name``, keeping the model's noise schedule config."""
    if name is None:
        return
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config,
                                                                      **SCHEDULER_OPTIONS.get(name, {}))


def denoising_calls(pipe, steps: int) -> int:
    """How many UNet steps the pipeline's scheduler makes for ``steps`` (PNDM makes one more)."""
    import copy

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)
