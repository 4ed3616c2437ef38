"""fastdiff: a lean diffusion library whose hot paths are hand-written Triton kernels."""
from fastdiff import ops, schedule
from fastdiff.ops import use_backend

__version__ = "0.1.0"
__all__ = ["ops", "schedule", "use_backend", "__version__"]
