"""The denoising samplers `generate.sampler` names: one table, which the config validates
against (this module imports nothing heavy, so validating a config stays cheap)."""

from __future__ import annotations

from typing import Any

from oodscale.errors import InputError

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (diffusers scheduler class, its options); the config validates against this table
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),  # η = 0: deterministic given the initial noise
    # DPM-Solver++ (2nd-order multistep) in 15-25 steps instead of 50, on DDIM's time grid
    # ("leading": it starts below t = T-1, where the cosine schedule's x0 estimate blows up).
    # Converged at 20 steps, but to another sampler than "ddim": it follows the noise implied
    # by the clipped x0, where DDIM keeps the raw prediction (benchmarks.md), so it changes
    # label-mixup outliers and is a method setting, not a drop-in speed-up
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                  "solver_order": 2,
                                                  "timestep_spacing": "leading"}),
}


def make_sampler(kind: str, timesteps: int, steps: int, **schedule: Any):
    """A fresh diffusers scheduler set to `steps` denoising steps (multistep ones keep state,
    so every batch gets its own). `schedule` is the generator's noise schedule (beta_schedule,
    beta_start, ...; default the DDPM's cosine one); options a scheduler lacks are dropped."""
    import inspect

    import diffusers

    if kind not in SAMPLERS:
        raise InputError(f"unknown sampler {kind!r}; valid: {', '.join(SAMPLERS)}")
    class_name, options = SAMPLERS[kind]
    scheduler_cls = getattr(diffusers, class_name)
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    given = {"beta_schedule": "squaredcos_cap_v2", "clip_sample": True, **schedule, **options}
    if "clip_sample" not in accepted and "thresholding" in accepted:
        # DPM-Solver++ has no clip_sample; its dynamic thresholding capped at 1 is the same
        # clip of the predicted x0 to [-1, 1] that DDPM and DDIM make every step. Without it,
        # guided pixel-space samples overshoot and the outliers differ from DDIM's.
        given.update(thresholding=given["clip_sample"], sample_max_value=1.0)
    scheduler = scheduler_cls(num_train_timesteps=timesteps,
                              **{k: v for k, v in given.items() if k in accepted})
    scheduler.set_timesteps(min(steps, timesteps))
    return scheduler
