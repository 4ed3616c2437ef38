"""fastdiff's hot paths: Triton kernels with a PyTorch reference next to each.

Which one runs is decided per call (see ``_backend``): CUDA tensors take the
Triton kernel, CPU tensors the reference, ``FASTDIFF_BACKEND=interpret`` runs the
kernels on the CPU through Triton's interpreter, and ``use_backend("reference")``
forces the reference anywhere.

One module per hot path: noising, group_norm, attention, sampler_step.
"""
import importlib

from fastdiff.ops._backend import current_backend, use_backend
from fastdiff.ops.noising import diffusion_loss, min_snr_weight, q_sample, training_target

# Public names of the other hot-path modules, imported on first use so that
# `import fastdiff` stays cheap.
_LAZY = {
    "group_norm_silu": "group_norm",
    "attention": "attention",
    "sampler_step": "sampler_step",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"fastdiff.ops.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastdiff.ops' has no attribute {name!r}")


__all__ = [
    "current_backend",
    "use_backend",
    "q_sample",
    "training_target",
    "min_snr_weight",
    "diffusion_loss",
    *_LAZY,
]
