"""fastdiff.schedule against diffusers' schedulers (a test-only oracle)."""
import numpy as np
import pytest
import torch

from fastdiff import schedule

diffusers = pytest.importorskip("diffusers")

T_VALUES = [1000, 1234]  # 1234: a T that the step counts below do not divide


def _diffusers_kwargs(kind: str, T: int) -> dict:
    if kind == "linear":
        return {"beta_schedule": "linear", "beta_start": 1e-4 * 1000 / T, "beta_end": 0.02 * 1000 / T}
    if kind == "scaled_linear":
        return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return {"beta_schedule": "squaredcos_cap_v2"}


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("kind", schedule.SCHEDULES)
@pytest.mark.parametrize("ztsnr", [False, True])
def test_betas_and_alphas_cumprod_match_diffusers(kind, T, ztsnr):
    ours = schedule.make_schedule(kind, T, zero_terminal_snr=ztsnr)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=ztsnr, **_diffusers_kwargs(kind, T))
    # diffusers keeps β in float32: agreement is to float32 rounding.  Its zero-SNR
    # rescale also subtracts in float32, which costs small β ~3 digits: compare those
    # absolutely (ours is float64 throughout).
    rtol, atol = (2e-5, 5e-6) if ztsnr else (2e-6, 1e-9)
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    assert torch.all(ours.betas[:-1] > 0) and torch.all(ours.betas[:-1] < 1)
    if ztsnr:  # ᾱ_{T-1} = 0 means β_{T-1} = 1
        assert ours.alphas_cumprod[-1].item() == 0.0 and ours.betas[-1].item() == pytest.approx(1.0)
        assert ours.snr()[-1].item() == 0.0
    elif kind == "cosine":
        assert ours.betas.max().item() <= 0.999


def test_linear_scales_with_T():
    for T in (500, 1000, 4000):
        betas = schedule.linear_betas(T)
        assert betas[0].item() == pytest.approx(1e-4 * 1000 / T)
        assert betas[-1].item() == pytest.approx(0.02 * 1000 / T)


def test_cosine_matches_closed_form_alpha_bar():
    T = 1000
    acp = schedule.make_schedule("cosine", T).alphas_cumprod
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    # identical until the β clip at 0.999 bites near t = T
    torch.testing.assert_close(acp[:-5], expected[:-5], rtol=1e-10, atol=0)


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("spacing", schedule.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize("oracle", ["DDIMScheduler", "DDPMScheduler"])
def test_integer_timesteps_match_diffusers(oracle, spacing, steps, T):
    offset = 1 if spacing == "leading" else 0
    sched = getattr(diffusers, oracle)(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    ours = schedule.timesteps(steps, T, spacing, steps_offset=offset)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, sched.timesteps.to(torch.int64))
    assert torch.all(ours[:-1] > ours[1:]), "timesteps must be strictly descending"


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("spacing", schedule.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_solver_timesteps_match_dpm_solver(spacing, steps, T):
    offset = 1 if spacing == "leading" else 0
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    ours = schedule.solver_timesteps(steps, T, spacing, steps_offset=offset)
    assert ours.dtype == torch.int64 and torch.equal(ours, sched.timesteps)


@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("spacing", schedule.SPACINGS)
@pytest.mark.parametrize("kind", schedule.SCHEDULES)
@pytest.mark.parametrize("ztsnr", [False, True])
def test_euler_timesteps_and_sigmas_match_diffusers(kind, spacing, T, ztsnr):
    steps = 30
    offset = 1 if spacing == "leading" else 0
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=ztsnr,
        **_diffusers_kwargs(kind, T),
    )  # fmt: skip
    sched.set_timesteps(steps)
    ours_sched = schedule.make_schedule(kind, T, zero_terminal_snr=ztsnr)
    t = schedule.continuous_timesteps(steps, T, spacing, steps_offset=offset)
    torch.testing.assert_close(t, sched.timesteps.double(), rtol=1e-6, atol=1e-3)
    sigmas = schedule.sigmas_at(t, ours_sched)
    # diffusers forms 1 − ᾱ (and the zero-SNR rescale) in float32: the small σ near
    # t = 0 carry ~1e-6 (~1e-5 rescaled) absolute error there; ours is float64.
    atol = 2e-5 if ztsnr else 5e-6
    torch.testing.assert_close(sigmas, sched.sigmas[:-1].double(), rtol=2e-5, atol=atol)


def test_sigmas_relation_and_terminal_floor():
    s = schedule.make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    acp = s.alphas_cumprod
    sig = s.sigmas
    torch.testing.assert_close(sig[:-1], ((1 - acp[:-1]) / acp[:-1]).sqrt())
    assert torch.isfinite(sig).all() and sig[-1].item() == pytest.approx(2.0**12, rel=1e-3)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="kind"):
        schedule.make_schedule("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        schedule.make_schedule("linear", 1)
    with pytest.raises(ValueError, match="spacing"):
        schedule.timesteps(10, 1000, "uniform")
    with pytest.raises(ValueError, match="num_steps"):
        schedule.timesteps(0, 1000)
    with pytest.raises(ValueError, match="num_steps"):
        schedule.timesteps(1001, 1000)
