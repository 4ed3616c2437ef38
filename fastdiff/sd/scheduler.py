r"""A diffusers ``scheduler_config.json`` → fastdiff's schedule, default sampler and sampling plans.

diffusers keeps the noise schedule, the timestep spacing and the update rule in one
stateful scheduler object.  fastdiff keeps them apart: a `Schedule` (β_t), an explicit
timestep sequence (`fastdiff.schedule`) and a plan (`fastdiff.samplers`).
`read_scheduler_config` reads the folder's file into a `SchedulerConfig`; `sampling`
builds, for a fastdiff sampler, the plan that diffusers' scheduler of that kind runs when
built from the same config (``XScheduler.from_config(pipe.scheduler.config)``):

    sampler    diffusers scheduler                                   timesteps
    ddim       DDIMScheduler (η = 0)                                 `timesteps`, landing on t − ⌊T/N⌋
    ddpm       DDPMScheduler                                         `timesteps`
    euler      EulerDiscreteScheduler                                `continuous_timesteps`
    euler_a    EulerAncestralDiscreteScheduler                       `continuous_timesteps`
    dpmpp_2m   DPMSolverMultistepScheduler (dpmsolver++, 2nd order)  `solver_timesteps`
    heun       HeunDiscreteScheduler                                 `continuous_timesteps`

ddim, euler and dpmpp_2m reproduce their scheduler to float rounding; ddpm and euler_a
draw their noise from per-image seeds (same law, other numbers); heun skips the
corrector above σ = 80 (`samplers.heun_plan`).  The folder's own class picks the
default sampler (`SCHEDULERS`): the same method when fastdiff has it, else the nearest
one (PNDM's PLMS, LMS, UniPC, DEIS: multistep ODE solvers → dpmpp_2m).

Initial noise: diffusers' Euler-family schedulers multiply the N(0, I) latents by
``init_noise_sigma`` = σ_max for "linspace"/"trailing" spacing, sqrt(σ_max² + 1) for
"leading", and feed the model x/sqrt(σ² + 1).  In fastdiff's variance-preserving state that
is x_T = latents·σ_max/sqrt(σ_max² + 1), or the latents themselves (`Sampling.noise_scale`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from fastdiff import samplers
from fastdiff import schedule as schedules
from fastdiff.pipelines import SAMPLERS, Sampling
from fastdiff.sd.folder import read_json

# diffusers scheduler class → (the fastdiff sampler it maps to, its defaults that differ from _DEFAULTS).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "DDIMScheduler": ("ddim", dict(timestep_spacing="leading", clip_sample=True)),
    "DDPMScheduler": ("ddpm", dict(timestep_spacing="leading", clip_sample=True)),
    "PNDMScheduler": ("dpmpp_2m", dict(timestep_spacing="leading", set_alpha_to_one=False)),
    "EulerDiscreteScheduler": ("euler", {}),
    "EulerAncestralDiscreteScheduler": ("euler_a", {}),
    "HeunDiscreteScheduler": ("heun", dict(beta_start=0.00085, beta_end=0.012)),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", {}),
    "DPMSolverSinglestepScheduler": ("dpmpp_2m", {}),
    "UniPCMultistepScheduler": ("dpmpp_2m", {}),
    "DEISMultistepScheduler": ("dpmpp_2m", {}),
    "LMSDiscreteScheduler": ("dpmpp_2m", {}),
    "KDPM2DiscreteScheduler": ("heun", dict(beta_start=0.00085, beta_end=0.012)),
    "KDPM2AncestralDiscreteScheduler": ("euler_a", dict(beta_start=0.00085, beta_end=0.012)),
}
# diffusers' defaults for a key the config leaves out (set_alpha_to_one: DDIM's, for folders
# whose class has no such key).  clip_sample is off unless the folder asks for it: DDIM's
# own default (on, at ±1) would clamp SD's latents.
_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
    "timestep_spacing": "linspace", "steps_offset": 0, "prediction_type": "epsilon", "set_alpha_to_one": True,
    "clip_sample": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False, "variance_type": "fixed_small",
}  # fmt: skip
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
# DDPM's posterior variance (None: DPM-Solver's spelling of "not learned").
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "fixed_large_log": "fixed_large", None: "fixed_small"}  # fmt: skip
# Options fastdiff refuses (they change what the model sees), and those it reads but does
# not reproduce (they only respace σ): each with its neutral value.
_REFUSED = {"trained_betas": None, "thresholding": False}
_NOT_REPRODUCED = {
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
}  # fmt: skip
_SIGMA_PLANS = {"euler": samplers.euler_plan, "euler_a": samplers.euler_ancestral_plan, "heun": samplers.heun_plan}


@dataclass(frozen=True)
class SchedulerConfig:
    """What a folder's scheduler decides, in fastdiff's terms."""

    class_name: str  # the diffusers scheduler class of the folder
    num_train_timesteps: int  # T
    beta_schedule: str  # fastdiff's schedule kind: linear, scaled_linear or cosine
    beta_start: float  # β_0 (linear, scaled_linear)
    beta_end: float  # β_{T−1}
    prediction: str  # what the UNet predicts: epsilon, v or sample
    spacing: str  # timestep_spacing: leading, trailing or linspace
    steps_offset: int  # added to "leading" timesteps (SD: 1)
    set_alpha_to_one: bool  # DDIM: ᾱ after the last step is 1 (else ᾱ_0)
    clip_sample: float | None  # DDIM/DDPM: clamp x̂0 to ±this (None: off)
    zero_terminal_snr: bool  # β rescaled to ᾱ_{T−1} = 0 (Lin et al. 2023)
    variance: str  # DDPM's posterior variance: fixed_small or fixed_large

    @property
    def sampler(self) -> str:
        """The fastdiff sampler this folder's scheduler class maps to."""
        return SCHEDULERS[self.class_name][0]

    def schedule_spec(self) -> dict:
        """The ``schedule`` entry of a pipeline spec (`fastdiff.schedule.make_schedule`'s arguments)."""
        betas = {} if self.beta_schedule == "cosine" else {"beta_start": self.beta_start, "beta_end": self.beta_end}
        return {"kind": self.beta_schedule, "num_timesteps": self.num_train_timesteps, **betas,
                "zero_terminal_snr": self.zero_terminal_snr}  # fmt: skip


def _choice(file: Path, key: str, value, table: dict):
    if value not in table:
        raise ValueError(f"{file}: {key}={value!r} is not supported (fastdiff reads {[k for k in table if k]})")
    return table[value]


def read_scheduler_config(file: Path) -> SchedulerConfig:
    """The `SchedulerConfig` of ``scheduler_config.json``; raises naming the file for a class or
    option fastdiff cannot run, and warns for σ-spacing options it does not reproduce."""
    raw = read_json(file)
    name = raw.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"{file}: unknown scheduler class {name!r}; fastdiff maps {', '.join(SCHEDULERS)}")
    config = {**_DEFAULTS, **SCHEDULERS[name][1], **raw}
    for key, neutral in _REFUSED.items():
        if config.get(key, neutral) not in (neutral, []):
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported")
    for key, neutral in _NOT_REPRODUCED.items():
        if config.get(key, neutral) != neutral:
            warnings.warn(f"{file}: {key}={config[key]!r} is not reproduced; σ follows timestep_spacing", stacklevel=3)
    spacing = config["timestep_spacing"]
    if spacing not in schedules.SPACINGS:
        raise ValueError(f"{file}: timestep_spacing={spacing!r} is not supported (fastdiff reads {schedules.SPACINGS})")
    return SchedulerConfig(
        class_name=name,
        num_train_timesteps=int(config["num_train_timesteps"]),
        beta_schedule=_choice(file, "beta_schedule", config["beta_schedule"], _BETA_SCHEDULES),
        beta_start=float(config["beta_start"]),
        beta_end=float(config["beta_end"]),
        prediction=_choice(file, "prediction_type", config["prediction_type"], _PREDICTIONS),
        spacing=spacing,
        steps_offset=int(config["steps_offset"]),
        set_alpha_to_one=bool(config["set_alpha_to_one"]),
        clip_sample=float(config["clip_sample_range"]) if config["clip_sample"] else None,
        zero_terminal_snr=bool(config["rescale_betas_zero_snr"]),
        variance=_choice(file, "variance_type", config["variance_type"], _VARIANCES),
    )


def sampling(
    config: SchedulerConfig, schedule: schedules.Schedule, sampler: str, steps: int, *, skip: int = 0
) -> Sampling:
    """The `Sampling` for ``sampler`` over ``steps`` steps, as diffusers' scheduler of that kind runs it.

    skip: leave out the first ``skip`` of the ``steps`` timesteps (image-to-image starts part of the
    way down, as diffusers' ``scheduler.timesteps[t_start:]``); the rest keep their places.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    T = config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
    if not 0 <= skip < steps:
        raise ValueError(f"skip must leave at least one of the {steps} steps, got {skip!r}")
    spacing = (steps, T, config.spacing, config.steps_offset)
    pred = config.prediction
    if sampler == "ddim":
        ts = schedules.timesteps(*spacing)
        plan = samplers.ddim_plan(
            schedule, ts[skip:], prediction=pred, final_alpha_one=config.set_alpha_to_one,
            prev_timesteps=(ts - T // steps)[skip:],
        )  # fmt: skip
        return Sampling(plan, clip_x0=config.clip_sample)
    if sampler == "ddpm":
        ts = schedules.timesteps(*spacing)[skip:]
        return Sampling(samplers.ddpm_plan(schedule, ts, variance=config.variance, prediction=pred),
                        clip_x0=config.clip_sample)  # fmt: skip
    if sampler == "dpmpp_2m":
        return Sampling(samplers.dpmpp_2m_plan(schedule, schedules.solver_timesteps(*spacing)[skip:], prediction=pred))
    ts = schedules.continuous_timesteps(*spacing)[skip:]
    plan = _SIGMA_PLANS[sampler](schedule, ts, prediction=pred)
    return Sampling(plan, noise_scale=_noise_scale(config, schedule, ts))


def _noise_scale(config: SchedulerConfig, schedule: schedules.Schedule, ts) -> float:
    """x_T's scale for a σ-space sampler: see the module docstring (1 for "leading" spacing)."""
    if config.spacing == "leading":
        return 1.0
    s = float(schedules.sigmas_at(ts[:1], schedule)[0])
    return s / math.sqrt(s * s + 1)
