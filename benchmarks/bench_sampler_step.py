"""One denoising step: the fused ``sampler_step`` vs the eager chain of PyTorch ops doing the same.

Bytes (the minimum one step must move through memory), with E = elements of x:
    reads   x (s_x) + o_c, o_u (2·s_o) [+ known (s_x) + mask (s_x / C, one value per pixel)]
    writes  x_next (s_x)
    rescale: + o_c and o_u read once more by the statistics pass (counted: it is real traffic)
where s_x, s_o are the element sizes of the state and of the model output.

The eager chain is what a diffusers-style loop runs per step: guidance combine, (rescale),
prediction conversion, the update, ``torch.randn_like`` noise, the inpainting blend — each a
separate kernel; ``torch.compile`` of the same chain is the second baseline (GPU only).
Targets on an H100: ≥ 90% of the measured copy bandwidth, ≥ 4× the eager chain.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case, compile_baselines
from fastdiff.ops.sampler_step import sampler_step, step_coefficients

SHAPES = [(8, 4, 64, 64), (8, 3, 256, 256)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# name: (rescale, noise, inpaint)
CONFIGS = {
    "ddim+cfg": (False, False, False),
    "ddpm+cfg+noise": (False, True, False),
    "cfg+rescale": (True, False, False),
    "inpaint+cfg+noise": (False, True, True),
}


def _eager_chain(x, o_c, o_u, w, phi, c, noise, known, mask):
    """The same step as separate PyTorch ops, in fp32 like the kernel, stored in x's dtype."""
    o = o_u.float() + w * (o_c.float() - o_u.float())
    if phi:
        dims = tuple(range(1, o.ndim))
        o = phi * o * (o_c.float().std(dim=dims, keepdim=True) / o.std(dim=dims, keepdim=True)) + (1 - phi) * o
    c = {**dict.fromkeys(("x0_from_x", "x0_from_out", "eps_from_x", "eps_from_out", "x", "x0", "eps", "noise",
                          "known", "known_noise"), 0.0), **c}  # the names step_coefficients defaults to 0
    xf = x.float()
    x0 = c["x0_from_x"] * xf + c["x0_from_out"] * o
    eps = c["eps_from_x"] * xf + c["eps_from_out"] * o
    x_next = c["x"] * xf + c["x0"] * x0 + c["eps"] * eps
    if noise:
        x_next = x_next + c["noise"] * torch.randn_like(xf)
    if known is not None:
        renoised = c["known"] * known.float() + c["known_noise"] * torch.randn_like(xf)
        x_next = mask * x_next + (1 - mask) * renoised
    return x_next.to(x.dtype)


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    shapes = SHAPES[:1] if quick else SHAPES
    dtypes = {"fp32": torch.float32} if quick and device == "cpu" else DTYPES
    for shape in shapes:
        B, C = shape[0], shape[1]
        for dname, dtype in dtypes.items():
            for cname, (rescale, noise, inpaint) in CONFIGS.items():
                x = torch.randn(shape, device=device, dtype=dtype)
                o_c, o_u = torch.randn_like(x), torch.randn_like(x)
                seeds = torch.arange(B, device=device, dtype=torch.int64)
                # a DDPM-like step with ε-prediction (values matter only for the eager chain's FLOPs)
                named = dict(x0_from_x=1.2, x0_from_out=-0.6, eps_from_out=1.0, x=0.9, x0=0.1, noise=0.05 * noise,
                             known=0.9, known_noise=0.4)  # fmt: skip
                coeffs = step_coefficients(**named).float().to(device)
                known = torch.randn_like(x) if inpaint else None
                mask = (torch.rand(B, 1, *shape[2:], device=device) < 0.5).to(dtype) if inpaint else None
                phi = 0.7 if rescale else 0.0
                kw = dict(uncond_output=o_u, guidance_scale=7.5, guidance_rescale=phi, seeds=seeds, step=3,
                          add_noise=noise, known=known, mask=mask)  # fmt: skip

                def ours(x=x, o_c=o_c, coeffs=coeffs, kw=kw):
                    return sampler_step(x, o_c, coeffs, **kw)

                def eager(x=x, o_c=o_c, o_u=o_u, phi=phi, noise=noise, known=known, mask=mask):
                    return _eager_chain(x, o_c, o_u, 7.5, phi, named, noise, known, mask)

                impls = {"fastdiff": ours, "eager": eager}
                if compile_baselines():
                    impls["torch.compile"] = torch.compile(eager, dynamic=False)
                s = x.element_size()
                E = x.numel()
                nbytes = E * (s + 2 * s + s)  # x, o_c, o_u, x_next
                if inpaint:
                    nbytes += E * s + (E // C) * s
                if rescale:
                    nbytes += 2 * E * s
                out.append(Case("sampler_step", f"{tuple(shape)} {cname}", dname, impls, bytes=nbytes))
    return out
