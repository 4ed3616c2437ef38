"""Checks of what a user passes in — numbers, output paths, devices — shared by the Python API
and the command line, so that bad input fails in one line that names the argument, before
any work starts.

Library functions call ``check_int`` / ``check_number`` / ``check_out_dir`` / ... with their
keyword's name; the command line declares the same checks as argparse types (``int_arg``,
``number_arg``, ``device_arg``), so ``fastdiff sample --steps 0`` and ``generate(steps=0)``
are refused by the same code, each naming its own spelling of the argument.

Upper bounds.  A count is refused when what it asks for cannot fit: `check_fits_in_memory`
compares an estimate of the bytes a call must hold at once with the machine's physical
memory (a refusal in milliseconds instead of a ``MemoryError`` or an OOM kill after minutes).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

SEED_LIMIT = 2**63  # seeds are int64 Philox keys: every seed lies in [0, 2**63)
MAX_THREADS = 1024
# Images per model call.  Far above what any batch gains in throughput (a GPU is saturated
# long before), and a batch this large of even 32×32 images needs tens of GB of activations.
MAX_BATCH = 4096


# ----------------------------------------------------------------------------- numbers


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (a bound of None is open); ValueError naming ``name`` otherwise.

    bool and float are refused even when they hold an integral value: ``steps=True`` or
    ``per_prompt=1e9`` is a mistake, not a count.
    """
    problem = _int_problem(value, low, high)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value


def check_number(
    value, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> float:
    """``value`` as a finite float in [low, high] (``low_open``: (low, high]); ValueError naming ``name``
    (TypeError for something that is not a number).

    NaN and ±inf are always refused: a NaN guidance scale turns every image black, and NaN
    slips through a range check written as ``if x < low: raise`` (every comparison with NaN
    is False), so finiteness is checked explicitly.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    problem = _number_problem(value, low, high, low_open)
    if problem:
        raise ValueError(f"{name} {problem}")
    return float(value)


def check_seed(value, name: str, count: int = 1) -> int:
    """A base seed whose ``count`` consecutive seeds (seed, seed + 1, …) are all valid int64 keys."""
    return check_int(value, name, 0, SEED_LIMIT - max(count, 1))


def _int_problem(value, low, high) -> str | None:
    """What is wrong with ``value`` as an int in [low, high], as "must be …, got …"; None if nothing."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return None
    return f"must be an int{_range(low, high)}, got {value!r}"


def _number_problem(value, low, high, low_open: bool) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high):
        return None
    return f"must be a finite number{_range(low, high, low_open)}, got {value!r}"


def _range(low, high, low_open: bool = False) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low}"
    if low is None:
        return f" <= {high}"
    return f" in {'(' if low_open else '['}{low}, {high}]"


# ----------------------------------------------------------------------------- memory


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_in_memory(nbytes: float, what: str, hint: str = "") -> None:
    """Refuse a request whose estimated resident size, ``nbytes``, exceeds the machine's RAM.

    ``what`` says what is asked for ("--per-prompt 1000000000 × 3 prompts"), ``hint`` what to
    do instead.  The estimate is the caller's (bytes per item × items, written next to the call).
    """
    ram = physical_memory()
    if ram is not None and nbytes > ram:
        more = f"; {hint}" if hint else ""
        need = f"that needs about {_size(nbytes)} of memory, more than this machine's {_size(ram)}"
        raise ValueError(f"{what}: {need}{more}")


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- output paths


def check_out_dir(path: str | os.PathLike, name: str) -> Path:
    """An output folder that exists or can be created, and can be written to; nothing is created.

    Raises NotADirectoryError when ``path`` (or a folder on its way) is a file, PermissionError
    when the folder it would be made in (or itself) refuses a file.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{name} {str(out)!r} exists and is not a folder")
    _check_writable(out, name, str(out))
    return out


def check_out_file(path: str | os.PathLike, name: str) -> Path:
    """An output file path whose folder exists or can be created and takes a new file; nothing is created.

    An existing file is fine (it is replaced); an existing folder is refused.
    """
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"{name} {str(out)!r} is a folder; give a file name")
    if out.name in ("", ".", ".."):
        raise ValueError(f"{name} {str(out)!r} does not name a file")
    _check_writable(out.parent, name, str(out))
    return out


def _check_writable(folder: Path, name: str, shown: str) -> None:
    """Probe the nearest existing folder of ``folder`` with a temporary file (what mkdir / open would need)."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{name} {shown!r} cannot be created: {str(existing)!r} is a file, not a folder")
    probe = existing / f".fastdiff-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{name} {shown!r} is not writable: {e.strerror or e} in {str(existing)!r}") from None


# ----------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """``device`` as a torch.device that this machine has (None: CUDA when available, else the CPU).

    Refuses in one line a device string torch does not parse ("banana") and a device that is
    not here ("cuda" on a machine without a usable CUDA GPU, "cuda:3" with two GPUs), instead
    of the traceback torch gives at the first ``.to(device)``.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ValueError(f"{name} {device!r}: no CUDA GPU is available here (torch {torch.__version__}, {build})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{name} {device!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise ValueError(f"{name} must be cpu, cuda, cuda:N or mps, got {device!r}")
    return dev


# ----------------------------------------------------------------------------- command-line types
# argparse calls a ``type`` with the option's text; an ArgumentTypeError becomes its one-line
# error "argument --steps: must be an int >= 1, got 0" (exit status 2, before any work).


def int_arg(low: int | None = None, high: int | None = None):
    """argparse type: an int in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = text  # reported as it was given: "got '1e9'"
        return _parsed(value, _int_problem(value, low, high))

    parse.__name__ = "int"
    return parse


def number_arg(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """argparse type: a finite float in [low, high] (``low_open``: (low, high]); "nan" and "inf" are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = text
        return _parsed(value, _number_problem(value, low, high, low_open))

    parse.__name__ = "number"
    return parse


def device_arg(text: str) -> str:
    """argparse type: a device this machine has (`resolve_device`); the text itself is kept."""
    try:
        resolve_device(text, "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None
    return text


def _parsed(value, problem: str | None):
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value
