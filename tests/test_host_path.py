"""The host path: the ops' unchecked entries give the public ops' numbers bit for bit."""
import torch

from fastdiff.ops import noising
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
