"""Schedulers by name: our short names -> (diffusers class, the config it needs on top).

A swap is `Class.from_config(pipe.scheduler.config, **extra)`, as diffusers recommends: the
model's own noise schedule (betas, prediction type, offsets) is kept, only the solver changes.
Names follow the sampler names people know from other UIs (diffusers' scheduler overview maps
them the same way). All of them solve the noise-prediction (DDPM-family) ODE/SDE; models trained
for flow matching (SD3, Flux) keep their FlowMatch* scheduler and are refused here.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from truthgpt.errors import ConfigError, did_you_mean_sentence

# Options that tell variants of one class apart are always given explicitly, so that swapping
# from "dpm++_2m_karras" to "dpm++_2m" does not inherit the Karras sigmas through the config.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    # PLMS as Stable Diffusion ships it: the Runge-Kutta warm-up steps are skipped.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "lms": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "dpm++_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpm++_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    # The stochastic single-step DPM-Solver++ (Lu et al. 2022); DPMSolverSDEScheduler would need
    # the extra torchsde package for the same sampler family. lower_order_final: diffusers turns
    # it on itself at every set_timesteps (its final sigma is zero), with a warning each time.
    "dpm++_sde": (
        DPMSolverSinglestepScheduler,
        {
            "algorithm_type": "sde-dpmsolver++",
            "use_karras_sigmas": False,
            "lower_order_final": True,
        },
    ),
    "unipc": (UniPCMultistepScheduler, {"use_karras_sigmas": False}),
    # Meant for LCM-distilled weights or an LCM LoRA; on other models it runs but draws poorly.
    "lcm": (LCMScheduler, {}),
}


def is_flow_matching(scheduler: object) -> bool:
    """True for the flow-matching schedulers (FlowMatchEulerDiscreteScheduler and kin)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Replace `pipe.scheduler` by the named one, keeping the model's noise schedule."""
    if name not in SCHEDULERS:
        hint = did_you_mean_sentence(name, SCHEDULERS)
        raise ConfigError(
            f"diffusion.scheduler: unknown scheduler {name!r}.{hint} "
            f"Known: {', '.join(SCHEDULERS)}."
        )
    current = type(pipe.scheduler).__name__
    if is_flow_matching(pipe.scheduler):
        raise ConfigError(
            f"diffusion.scheduler: this model samples with {current}, a flow-matching scheduler; "
            f"{name!r} and the other named schedulers solve the noise-prediction ODE and would "
            "draw noise. Leave diffusion.scheduler empty to keep the model's own."
        )
    cls, extra = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
