"""fastdiff's hot paths: Triton kernels with a PyTorch reference next to each.

Which one runs is decided per call (see ``_backend``): CUDA tensors take the
Triton kernel, CPU tensors the reference, ``FASTDIFF_BACKEND=interpret`` runs the
kernels on the CPU through Triton's interpreter, and ``use_backend("reference")``
forces the reference anywhere.

One module per hot path: noising, group_norm, flash_attention (the ``attention`` op) and
fused_step (the ``sampler_step`` op); no module shares its name with a function.  On CUDA the
kernels launch through libfastdiff_kernels, their ahead-of-time build, when it is installed
(``info()`` says which path each op takes; ``dry_run()`` plans launches without a GPU).
"""
from fastdiff.ops._aot import dry_run, info
from fastdiff.ops._backend import current_backend, use_backend
from fastdiff.ops.group_norm import group_norm_silu
from fastdiff.ops.noising import diffusion_loss, min_snr_weight, q_sample, training_target
from fastdiff.ops.flash_attention import attention
from fastdiff.ops.fused_step import sampler_step

__all__ = [
    "info",
    "dry_run",
    "current_backend",
    "use_backend",
    "q_sample",
    "training_target",
    "min_snr_weight",
    "diffusion_loss",
    "group_norm_silu",
    "attention",
    "sampler_step",
]
