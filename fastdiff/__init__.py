"""fastdiff: a lean diffusion library whose hot paths are hand-written Triton kernels."""
import importlib

from fastdiff import ops, schedule
from fastdiff.dropin import is_patched, patch, unpatch
from fastdiff.ops import use_backend

__version__ = "0.1.0"

# The heavier layers (model, training, pipelines) load on first use, so that
# `import fastdiff` stays cheap for users who only want the ops.
_LAZY = {
    "generate": "fastdiff.pipelines",
    "train": "fastdiff.training",
    "Trainer": "fastdiff.training",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__all__ = ["ops", "schedule", "use_backend", "patch", "unpatch", "is_patched", "__version__", *_LAZY]
