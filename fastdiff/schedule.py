"""Noise schedules and timestep spacing (all arithmetic in float64).

Notation (Ho et al. 2020):
    β_t                  variance added at step t, t = 0 … T−1
    α_t  = 1 − β_t
    ᾱ_t  = Π_{s ≤ t} α_s          (``alphas_cumprod``)
    x_t  = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε            (Eq. 4)
    σ_t  = sqrt((1 − ᾱ_t) / ᾱ_t)   (k-diffusion / EDM noise level; x_t/sqrt(ᾱ_t) = x_0 + σ_t·ε)
    SNR_t = ᾱ_t / (1 − ᾱ_t) = 1/σ_t²

Schedules:
    linear         β from 1e-4 to 0.02 over T = 1000 steps, both ends scaled by 1000/T
                   (Ho et al. 2020; Nichol & Dhariwal 2021 for the scaling)
    scaled_linear  β = linspace(sqrt(0.00085), sqrt(0.012), T)²  (Stable Diffusion)
    cosine         ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β clipped at 0.999
                   (Nichol & Dhariwal 2021, Eq. 17)
    zero_terminal_snr=True rescales any of them so that ᾱ_{T−1} = 0 exactly
                   (Lin et al. 2023, Alg. 1): shift sqrt(ᾱ) so its last value is 0,
                   scale so its first value is unchanged.

Timestep spacing picks N of the T training steps for sampling, in descending order
(Lin et al. 2023, Table 2): ``leading``, ``trailing``, ``linspace``; ``steps_offset``
shifts ``leading`` (Stable Diffusion uses 1).  The conventions match diffusers'
schedulers, which the tests use as an oracle: `timesteps` those of DDIM and DDPM,
`continuous_timesteps` Euler's and Heun's, `solver_timesteps` DPM-Solver's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
MAX_BETA = 0.999  # the largest default β (Nichol & Dhariwal clip the cosine schedule there)


def linear_betas(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """β linear in t; the defaults 1e-4 … 0.02 are scaled by 1000/T (same total noise for any T)
    and clipped at 0.999 as the cosine schedule's are (below T = 20 the scaled β_end passes 1,
    where ᾱ would turn negative)."""
    scale = 1000.0 / num_timesteps
    start = min(scale * 1e-4, MAX_BETA) if beta_start is None else beta_start
    end = min(scale * 0.02, MAX_BETA) if beta_end is None else beta_end
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """β linear in sqrt(β): Stable Diffusion's schedule."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = MAX_BETA) -> torch.Tensor:
    """β_t = 1 − ᾱ(t+1)/ᾱ(t) for the cosine ᾱ, clipped at ``max_beta`` (avoids β = 1 at t = T−1)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale β so that the terminal SNR is exactly 0 (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule; every derived quantity is computed from ``betas``."""

    betas: torch.Tensor  # (T,) float64

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), with ᾱ = 0 replaced by 2⁻²⁴.

        That keeps σ finite (≈ 4096) at the last step of a zero-terminal-SNR
        schedule, where ᾱ = 0 exactly; σ-space samplers need a finite starting σ
        (diffusers' Euler schedulers make the same substitution).
        """
        acp = self.alphas_cumprod
        acp = torch.where(acp > 0, acp, torch.full_like(acp, 2.0**-24))
        return ((1 - acp) / acp).sqrt()

    def snr(self) -> torch.Tensor:
        """SNR_t = ᾱ_t / (1 − ᾱ_t): exactly 0 at the end of a zero-terminal-SNR schedule."""
        acp = self.alphas_cumprod
        return acp / (1 - acp)


def make_schedule(
    kind: str = "linear",
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    zero_terminal_snr: bool = False,
) -> Schedule:
    """Build a schedule by name: "linear", "scaled_linear" or "cosine"."""
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
    if kind == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif kind == "scaled_linear":
        kwargs = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
        betas = scaled_linear_betas(num_timesteps, **kwargs)
    elif kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("kind='cosine' takes no beta_start/beta_end")
        betas = cosine_betas(num_timesteps)
    else:
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    if not ((betas > 0) & (betas <= 1)).all():
        raise ValueError(f"every beta must be in (0, 1], got {kind} betas from {betas[0]:.6g} to {betas[-1]:.6g}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return Schedule(betas)


def _check_spacing(num_steps: int, num_timesteps: int, spacing: str) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_timesteps}], got {num_steps!r}")


def continuous_timesteps(
    num_steps: int, num_timesteps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """N descending (possibly fractional) timesteps in [0, T−1], float64.

    leading:  t_i = i·⌊T/N⌋ + steps_offset           (i = N−1 … 0)
    trailing: t_i = round(T − i·T/N) − 1              (i = 0 … N−1)
    linspace: N points evenly from T−1 down to 0 (not rounded: Euler-style samplers
              interpolate σ at fractional t; ``timesteps`` rounds them)
    """
    _check_spacing(num_steps, num_timesteps, spacing)
    T, N = num_timesteps, num_steps
    if spacing == "leading":
        t = (np.arange(N) * (T // N)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        # diffusers' np.arange(T, 0, -T/N), whose float length can hold one point too many (N = 61, T = 1000)
        t = np.round(np.arange(T, 0, -T / N)[:N]) - 1
    else:
        t = np.linspace(0, T - 1, N)[::-1]
    return torch.from_numpy(np.array(t, dtype=np.float64))  # a copy: t may be a reversed view


def timesteps(num_steps: int, num_timesteps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """N descending integer timesteps (int64) for DDPM/DDIM-style samplers."""
    return continuous_timesteps(num_steps, num_timesteps, spacing, steps_offset).round().to(torch.int64)


def sigmas_at(t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """σ at (fractional) timesteps by linear interpolation of the discrete σ_t (float64)."""
    sig = schedule.sigmas.numpy()
    return torch.from_numpy(np.interp(t.double().numpy(), np.arange(len(sig)), sig))


def solver_timesteps(
    num_steps: int, num_timesteps: int, spacing: str = "linspace", steps_offset: int = 0
) -> torch.Tensor:
    """N descending integer timesteps as diffusers' DPM-Solver and UniPC schedulers space them.

    ``leading`` and ``linspace`` place N + 1 points and drop the last one (t ≈ 0: the
    solver's final step goes to σ = 0 instead), so they take N < T; ``trailing`` is
    `timesteps`' trailing.
    """
    _check_spacing(num_steps, num_timesteps, spacing)
    if spacing == "trailing":
        return timesteps(num_steps, num_timesteps, spacing)
    if num_steps >= num_timesteps:  # N + 1 points in T timesteps: two would be the same
        raise ValueError(f"num_steps must be < {num_timesteps} with {spacing!r} spacing here, got {num_steps}")
    T, M = num_timesteps, num_steps + 1
    if spacing == "leading":
        t = (np.arange(M) * (T // M))[::-1] + steps_offset
    else:
        t = np.linspace(0, T - 1, M).round()[::-1]
    return torch.from_numpy(np.array(t[:-1], dtype=np.int64))
