"""torch.compile and CUDA graphs: fastdiff's ops are opaque custom ops with fake kernels.

On the CPU the models are traced with ``torch._dynamo.explain`` (no graph break, each
op one node of the graph) and compiled with ``fullgraph=True`` on the ``aot_eager``
backend, which runs the ops' fake implementations through AOT autograd (forward and
backward) without paying for Inductor's code generation.  The ops run their reference
path here (``use_backend("reference")``): the graph is the same whichever backend an op
picks at run time, because the choice happens inside the op.
"""
import copy
import importlib

import pytest
import torch
import torch._dynamo
from torch import nn

import fastdiff
from fastdiff import ops
from fastdiff.ops.fused_step import step_coefficients

from conftest import rel_err


@pytest.fixture(autouse=True)
def _reference_and_fresh_dynamo():
    torch._dynamo.reset()
    with fastdiff.use_backend("reference"):
        yield
    torch._dynamo.reset()


def fastdiff_nodes(explanation) -> list[str]:
    """The fastdiff op overloads called in the traced graphs, in order."""
    return [
        str(n.target)
        for g in explanation.graphs
        for n in g.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("fastdiff.")
    ]


def assert_one_graph(explanation) -> None:
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ----------------------------------------------------------------------------- every op in one model


class AllOps(nn.Module):
    """A toy denoiser touching every fastdiff op: GN+SiLU (with FiLM), attention, and around it
    the training ops (q_sample / training_target, diffusion_loss) and the sampler step."""

    def __init__(self, channels=32, groups=4, heads=1):
        super().__init__()
        self.groups, self.heads = groups, heads
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
        self.film = nn.Linear(1, 2 * channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x, t):
        B = x.shape[0]
        h = self.inp(x)
        scale, shift = self.film(t.float()[:, None] / 1000).chunk(2, dim=1)
        h = ops.group_norm_silu(h, self.groups, scale=scale, shift=shift)
        C, H, W = h.shape[1:]
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = ops.attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        h = h + a.transpose(1, 2).reshape(B, C, H, W)
        return self.out(h)


def _training_loss(model, x0, t, acp, noise):
    x_t, _, target = ops.training_target(x0, t, acp, noise, prediction="v")
    x_t2, _ = ops.q_sample(x0, t, acp, noise)
    return ops.diffusion_loss(model(x_t + 0 * x_t2, t), target)


def _sampling_step(model, x, t, coeffs):
    out = model(torch.cat([x, x]), torch.cat([t, t]))
    uncond, cond = out.chunk(2)
    x_next, _ = ops.sampler_step(x, cond, coeffs, uncond_output=uncond, guidance_scale=3.0)
    return x_next


def _train_inputs():
    acp = torch.linspace(0.999, 0.01, 100)
    return torch.randn(2, 3, 5, 7), torch.tensor([3, 70]), acp, torch.randn(2, 3, 5, 7)


# Every op's call path: eager calls must not reach the registered op (the dispatcher's round
# trips cost more host time than the kernels), traced calls must (see test_every_op_traces...).
OP_CALLS = {
    "fastdiff.ops.group_norm": ("_group_norm_silu_call", "_group_norm_silu_backward_call"),
    "fastdiff.ops.flash_attention": ("_attention_fwd_call", "_attention_bwd_call"),
    "fastdiff.ops.noising": ("_noising_call", "_weighted_mse_call", "_weighted_mse_backward_call"),
    "fastdiff.ops.fused_step": ("_sampler_step_call",),
}


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """Eager forward and backward run the ops' implementations directly, with the numbers of the ops."""
    from fastdiff.ops import _backend

    calls = [getattr(importlib.import_module(m), name) for m, names in OP_CALLS.items() for name in names]
    for module in OP_CALLS:  # the list above names every op call path of the op modules
        found = {n for n, v in vars(importlib.import_module(module)).items() if isinstance(v, _backend.Op)}
        assert found == set(OP_CALLS[module]), module
    model, (x0, t, acp, noise) = AllOps(), _train_inputs()
    coeffs = step_coefficients(x0_from_x=1.1, x0_from_out=-0.4, eps_from_out=1.0, x=0.9, x0=0.1)
    with monkeypatch.context() as through_ops:  # as if traced: every call goes through the registered ops
        through_ops.setattr(_backend, "traced", lambda x: True)
        via_ops_loss = _training_loss(model, x0, t, acp, noise)
        via_ops_loss.backward()
        via_ops_grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            via_ops_step = _sampling_step(model, x0, t, coeffs)

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the registered op")

    for call in calls:
        monkeypatch.setattr(call, "registered", refuse)
    model.zero_grad()
    loss = _training_loss(model, x0, t, acp, noise)
    loss.backward()
    torch.testing.assert_close(loss, via_ops_loss)
    for p, g in zip(model.parameters(), via_ops_grads):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():
        torch.testing.assert_close(_sampling_step(model, x0, t, coeffs), via_ops_step)


def test_every_op_traces_into_one_graph():
    model = AllOps()
    x0, t, acp, noise = _train_inputs()
    ex = torch._dynamo.explain(_training_loss)(model, x0, t, acp, noise)
    assert_one_graph(ex)
    nodes = fastdiff_nodes(ex)
    for op in ("noising", "group_norm_silu", "attention_fwd", "weighted_mse"):
        assert sum(op in n for n in nodes) >= 1, (op, nodes)

    coeffs = step_coefficients(x0_from_x=1.2, x0_from_out=-0.4, eps_from_out=1.0, x0=0.9, eps=0.3).float()
    with torch.no_grad():
        ex = torch._dynamo.explain(_sampling_step)(model, x0, t, coeffs)
    assert_one_graph(ex)
    assert sum("sampler_step" in n for n in fastdiff_nodes(ex)) == 1


def test_every_op_compiles_fullgraph_forward_and_backward():
    """fullgraph compile through AOT autograd: the fake kernels and the backward registrations."""
    model = AllOps()
    twin = copy.deepcopy(model)
    x0, t, acp, noise = _train_inputs()
    loss = _training_loss(model, x0, t, acp, noise)
    loss.backward()
    compiled = torch.compile(_training_loss, fullgraph=True, backend="aot_eager")
    loss_c = compiled(twin, x0, t, acp, noise)
    loss_c.backward()
    assert rel_err(loss_c.detach(), loss.detach()) < 1e-6
    for (name, p), pc in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(pc.grad, p.grad) < 1e-5, name

    coeffs = step_coefficients(x0_from_x=1.2, x0_from_out=-0.4, eps_from_out=1.0, x0=0.9, eps=0.3).float()
    with torch.no_grad():
        ref = _sampling_step(model, x0, t, coeffs)
        out = torch.compile(_sampling_step, fullgraph=True, backend="aot_eager")(model, x0, t, coeffs)
    assert rel_err(out, ref) < 1e-6


# ----------------------------------------------------------------------------- models


def test_patched_diffusers_unet_has_no_graph_break():
    diffusers = pytest.importorskip("diffusers")
    from fastdiff import dropin
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), norm_num_groups=4, layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, cross_attention_dim=32, attention_head_dim=1, resnet_time_scale_shift="scale_shift",
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    report = dropin.patch(model)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(x, t, c)
        assert_one_graph(ex)
        nodes = fastdiff_nodes(ex)
        counts = report.counts()
        # one op per fused pair (two per ResnetBlock2D, one per head) and one per attention layer
        assert nodes.count("fastdiff.group_norm_silu.default") == 2 * counts["resnet_block"] + counts["output_head"]
        assert nodes.count("fastdiff.attention_fwd.default") == counts["attention"]
        eager = model(x, t, c).sample
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, c).sample
    assert rel_err(compiled, eager) < 1e-6


def test_fastdiff_unet_has_no_graph_break():
    from fastdiff.nn import UNet, UNetConfig

    cfg = UNetConfig.preset("tiny", context_dim=32, pooled_dim=16, model_channels=32, channel_mult=(1, 2))
    model = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, 8, 8)
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(x, torch.tensor([4, 900]), torch.randn(2, 3, 32), torch.randn(2, 16))
    assert_one_graph(ex)
    nodes = fastdiff_nodes(ex)
    assert "fastdiff.group_norm_silu.default" in nodes and "fastdiff.attention_fwd.default" in nodes


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_loop_captures_in_a_cuda_graph():
    """A patched diffusers UNet and the fused sampler step, three steps, captured and replayed."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff import dropin
    with fastdiff.use_backend("auto"):
        model = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128), norm_num_groups=32, layers_per_block=1, sample_size=16,
            cross_attention_dim=64, attention_head_dim=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ).to("cuda", torch.float16).eval()  # fmt: skip
        dropin.patch(model)
        coeffs = torch.stack([
            step_coefficients(x0_from_x=1.0 + s, x0_from_out=-0.5, eps_from_out=1.0, x0=0.8, eps=0.2) for s in range(3)
        ]).float().cuda()  # fmt: skip
        steps = torch.tensor([900, 500, 100], device="cuda")
        ctx = torch.randn(4, 7, 64, device="cuda", dtype=torch.float16)
        x_in = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)

        def loop(x):
            for i in range(3):
                out = model(torch.cat([x, x]), steps[i].expand(4), ctx).sample
                uncond, cond = out.chunk(2)
                x, _ = ops.sampler_step(x, cond, coeffs[i], uncond_output=uncond, guidance_scale=5.0)
            return x

        with torch.no_grad():
            ref = loop(x_in)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loop(x_in)  # warm-up: compile the kernels outside the capture
            torch.cuda.current_stream().wait_stream(side)
            static_x = x_in.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = loop(static_x)
            graph.replay()
            torch.cuda.synchronize()
    assert rel_err(static_out, ref) < 1e-3  # cuDNN may pick another conv algorithm inside the capture
