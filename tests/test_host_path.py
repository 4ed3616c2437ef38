"""The host path: the ops' unchecked entries give the public ops' numbers bit for bit; the
layout test that every op runs."""
import torch

from fastdiff.ops import _layout, noising
from fastdiff.schedule import make_schedule


# ----------------------------------------------------------------------------- unchecked entries


def test_noising_unchecked_entries_equal_the_public_ones():
    """q_sample, training_target and diffusion_loss (value and gradient) through their unchecked entries."""
    acp = make_schedule("cosine", 100).alphas_cumprod.float()
    x0, t = torch.randn(3, 2, 5, 7), torch.randint(0, 100, (3,))
    draws = [torch.Generator().manual_seed(11) for _ in range(2)]
    assert all(map(torch.equal, noising.q_sample(x0, t, acp, generator=draws[0]),
                   noising.q_sample_unchecked(x0, t, acp, generator=draws[1])))  # fmt: skip
    noise = torch.randn_like(x0)
    for prediction in noising.PREDICTIONS:
        public = noising.training_target(x0, t, acp, noise, prediction=prediction)
        unchecked = noising.training_target_unchecked(x0, t, acp, noise, prediction=prediction)
        assert all(map(torch.equal, public, unchecked))
    weight = torch.rand(3, dtype=torch.float64)
    grads = []
    for loss in (noising.diffusion_loss, noising.diffusion_loss_unchecked):
        pred = x0.clone().requires_grad_()
        value = loss(pred, noise.half(), weight)
        value.backward()
        grads.append((value.detach(), pred.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# ----------------------------------------------------------------------------- layouts


def _layout_by_view(x: torch.Tensor) -> str | None:
    """sample_layout's rule written with a view: contiguous, or channels-last (NC… with C moved last is contiguous)."""
    if x.is_contiguous():
        return "contiguous"
    if x.ndim >= 3 and x.stride(1) == 1 and x.movedim(1, -1).is_contiguous():
        return "channels_last"
    return None


def test_sample_layout_reads_strides_as_the_view_rule():
    """Random shapes (sizes 1 included, where any stride is allowed), permutations and slices."""
    g = torch.Generator().manual_seed(torch.seed() % 2**32)
    seen = set()
    for _ in range(400):
        ndim = int(torch.randint(1, 6, (), generator=g))
        shape = [int(s) for s in torch.randint(1, 4, (ndim,), generator=g)]
        x = torch.empty(shape).permute(*torch.randperm(ndim, generator=g).tolist())
        if ndim > 1 and bool(torch.rand((), generator=g) < 0.3):
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last storage
        if bool(torch.rand((), generator=g) < 0.2):
            x = x[..., ::2]
        got = _layout.sample_layout(x)
        assert got == _layout_by_view(x), (tuple(x.shape), x.stride())
        seen.add(got)
    assert seen == {"contiguous", "channels_last", None}
