"""Launch-table defaults measured by the tuning sweep (``scripts/tune_kernels.py --apply``): do not edit by hand.

TUNED[op][arch][head dim or key][role] = {"tiles": [...], ...}: a configuration that replaced the op's
declared default for that key because it measured faster on ``device`` (``ms`` against ``default_ms``, the
default's time, summed over the benchmark shapes that use the role).  An op reads only its own entry.
"""

TUNED: dict = {}
