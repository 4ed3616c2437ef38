r"""Training a text-conditioned UNet: `train` and `Trainer`.

One optimiser step (accumulated over ``grad_accum`` micro-batches):

    t ~ U{0, …, T−1},  ε ~ N(0, I)
    x_t, target = ops.training_target(x_0, t, ᾱ, prediction)          (Ho et al. 2020, Eq. 4;
                                                                          Salimans & Ho 2022 for v)
    w  = ops.min_snr_weight(t, ᾱ, γ, prediction)                        (Hang et al. 2023)
    L  = ops.diffusion_loss(UNet(x_t, t, text), target, w)
    text ← the empty prompt with probability ``cond_dropout``          (Ho & Salimans 2022, CFG)
    AdamW (Loshchilov & Hutter 2019), global-norm gradient clipping, linear warm-up;
    EMA of the weights with decay min(β, (1 + n)/(10 + n)) (the usual warm-up of the average).

Reproducibility: the data order is a seeded permutation per epoch and every random
draw of micro-batch m (timesteps, noise keys, dropout) comes from a generator seeded
with (seed, m).  A checkpoint therefore only needs weights, EMA, optimiser state
and the step counter: a resumed run is bit-identical to an uninterrupted one on CPU.

Distributed (torchrun; `fastdiff.distributed`): the model is wrapped in
DistributedDataParallel and the global batch of micro-batch m — ``batch_size``
examples — is split into contiguous slices, one per rank.  Its random draws (timesteps,
dropout, noise keys) are made for the whole global batch from the same (seed, m)
generator and each rank keeps its slice, so a step sees the same data, timesteps and
noise on any world size.  Each rank's loss is scaled by W·n_r/N (n_r of the N readable
examples of the micro-batch are its own), so DDP's gradient average is the gradient of
the global mean loss.  EMA, sample grids and checkpoint writing happen on rank 0 only,
followed by a barrier; every rank resumes from the same checkpoint, whatever the world
size that wrote it.

Checkpoints: ``<output_dir>/step_XXXXXXX/`` with ``model.safetensors``,
``ema.safetensors``, ``optimizer.safetensors`` (the AdamW state by parameter name, in
the state dict's split form) and ``state.json`` (step, configs, the size and SHA-256 of
every other file), plus ``pipeline.json`` so that
`fastdiff.pipelines.Text2Image.from_pretrained` loads the directory.  Each is written
and fsynced in a temporary folder that is renamed into place (an atomic rename on
POSIX), then ``latest`` is replaced atomically: a run killed mid-write, or a power
loss, leaves the previous checkpoint intact and ``latest`` pointing at it.  Resume
(`find_checkpoint`) walks back from the folder ``latest`` names to the newest whose
files match their records, and refuses a checkpoint whose `MODEL_FIELDS` (what the
model means: prediction, schedule, shape, resolution, text encoder) differ from the
run's unless they are allowed.  docs/training.md has the whole contract.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import shutil
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fastdiff import distributed, ops
from fastdiff.checks import check_out_dir
from fastdiff.data import Skipped, collate, report
from fastdiff.durable import fsync_path, replace_durably
from fastdiff.lockfile import LockFile
from fastdiff.nn.unet import PRESETS, UNet, UNetConfig
from fastdiff.schedule import SCHEDULES, make_schedule

PIPELINE_FILE = "pipeline.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# Upper bounds of the numbers a run takes: what lies beyond cannot fit.
MAX_STEPS = 9_999_999  # checkpoint folders are named step_XXXXXXX (7 digits)
MAX_BATCH = 65_536  # examples per micro-batch, and micro-batches per step
MAX_RESOLUTION = 4096  # one 4096² image already fills a GPU's memory with UNet activations
MAX_TIMESTEPS = 100_000  # T: the schedule's float64 tables stay small
MAX_SEED = 2**32 - 1  # seed·1_000_003 + micro-batch must stay a 64-bit generator seed

# Integer fields: [low, high] (sample_steps: at most num_timesteps, checked below).
INT_RANGES = {
    "resolution": (1, MAX_RESOLUTION),
    "num_timesteps": (2, MAX_TIMESTEPS),
    "steps": (1, MAX_STEPS),
    "batch_size": (1, MAX_BATCH),
    "grad_accum": (1, MAX_BATCH),
    "warmup_steps": (0, MAX_STEPS),
    "seed": (0, MAX_SEED),
    "checkpoint_every": (1, MAX_STEPS),
    "keep_checkpoints": (1, MAX_STEPS),
    "sample_every": (0, MAX_STEPS),
    "sample_steps": (1, MAX_TIMESTEPS),
}
# Real fields: the range each must lie in, besides being finite.  None disables the optional ones.
REAL_RANGES = {
    "lr": ("> 0", lambda x: x > 0),
    "weight_decay": (">= 0", lambda x: x >= 0),
    "grad_clip": ("> 0 (off: None; 0 on the command line)", lambda x: x > 0),
    "ema_decay": ("in [0, 1)", lambda x: 0 <= x < 1),
    "cond_dropout": ("in [0, 1)", lambda x: 0 <= x < 1),
    "min_snr_gamma": ("> 0 (off: None; 0 on the command line)", lambda x: x > 0),
}
OPTIONAL = ("grad_clip", "min_snr_gamma")
FLAGS = ("zero_terminal_snr", "gradient_checkpointing", "channels_last", "progress")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_numbers(cfg: "TrainConfig") -> None:
    """Every number of ``cfg`` finite and in its range (ints stored as int, reals as float, for state.json)."""
    for name, (low, high) in INT_RANGES.items():
        value = getattr(cfg, name)
        if not _is_int(value) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
        setattr(cfg, name, int(value))
    if cfg.sample_steps > cfg.num_timesteps:
        raise ValueError(f"sample_steps must be at most num_timesteps ({cfg.num_timesteps}), got {cfg.sample_steps}")
    for name, (wanted, ok) in REAL_RANGES.items():
        value = getattr(cfg, name)
        if value is None and name in OPTIONAL:
            continue
        if not _is_real(value) or not ok(value):
            raise ValueError(f"{name} must be a finite number {wanted}, got {value!r}")
        setattr(cfg, name, float(value))
    betas = cfg.adam_betas
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"adam_betas must be two finite numbers in [0, 1), got {betas!r}")
    cfg.adam_betas = tuple(float(b) for b in betas)
    for name in FLAGS:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")


def _check_choices(cfg: "TrainConfig") -> None:
    """The named settings of ``cfg``: prediction, precision, schedule, UNet preset and overrides, paths
    (stored as str, for state.json), sample prompts (stored as a tuple)."""
    if cfg.prediction not in ops.noising.PREDICTIONS:
        raise ValueError(f"prediction must be one of {ops.noising.PREDICTIONS}, got {cfg.prediction!r}")
    if cfg.mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'no', got {cfg.mixed_precision!r}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    for name in ("output_dir", "text_encoder"):
        value = getattr(cfg, name)
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise ValueError(f"{name} must be a non-empty path or name, got {value!r}")
        setattr(cfg, name, os.fspath(value))
    prompts = cfg.sample_prompts
    if not isinstance(prompts, (tuple, list)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"sample_prompts must be a list of strings, got {prompts!r}")
    cfg.sample_prompts = tuple(prompts)
    if cfg.model not in PRESETS:
        raise ValueError(f"model must be one of {sorted(PRESETS)}, got {cfg.model!r}")
    if not isinstance(cfg.model_overrides, dict):
        raise ValueError(f"model_overrides must be a dict of UNetConfig fields, got {cfg.model_overrides!r}")
    try:
        UNetConfig.preset(cfg.model, **cfg.model_overrides)
    except (TypeError, ValueError) as e:  # TypeError: a key that is not a UNetConfig field
        raise ValueError(f"model_overrides {cfg.model_overrides} do not make a {cfg.model!r} UNet: {e}") from e
    if UNetConfig.preset(cfg.model, **cfg.model_overrides).added_time_ids:
        raise ValueError(f"model {cfg.model!r} takes SDXL's time ids, which the trainer does not supply; "
                         "train a preset without added_time_ids")  # fmt: skip


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    The defaults are the recipe of the shipped ``tiny-shapes`` model.
    """

    output_dir: str = "runs/train"  # checkpoints, sample grids and the final pipeline go here
    model: str = "tiny"  # UNet preset name (see fastdiff.nn.unet.PRESETS)
    model_overrides: dict = field(default_factory=dict)  # UNetConfig fields to override in the preset
    text_encoder: str = "minilm"  # "minilm" or a local CLIP / BERT directory
    resolution: int = 32  # training images are resolution × resolution pixels
    schedule: str = "cosine"  # noise schedule (fastdiff.schedule.make_schedule)
    num_timesteps: int = 1000  # T
    zero_terminal_snr: bool = False  # rescale the schedule to SNR(T−1) = 0 (Lin et al. 2023)
    prediction: str = "v"  # network target: "epsilon", "v" or "sample"
    min_snr_gamma: float | None = 5.0  # min-SNR-γ loss weighting; None for plain MSE
    steps: int = 2500  # optimiser steps
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 2e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.99)  # AdamW β1, β2
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; None disables
    ema_decay: float = 0.995  # EMA decay β (0 disables the average: EMA = weights)
    cond_dropout: float = 0.1  # probability of training a sample on the empty prompt (for CFG)
    seed: int = 0  # seeds data order, timesteps, noise and dropout
    checkpoint_every: int = 250  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    sample_every: int = 0  # steps between sample grids (0: never)
    sample_prompts: tuple[str, ...] = ()  # prompts of the sample grid
    sample_steps: int = 20  # sampler steps for the grid
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "no"
    gradient_checkpointing: bool = False  # trade compute for activation memory
    channels_last: bool = True  # NHWC activations (faster convolutions on GPU tensor cores)
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        _check_choices(self)
        _check_numbers(self)

    def unet_config(self, context_dim: int, pooled_dim: int) -> UNetConfig:
        overrides = {"context_dim": context_dim, "pooled_dim": pooled_dim, **self.model_overrides}
        if self.gradient_checkpointing:
            overrides["gradient_checkpointing"] = True
        return UNetConfig.preset(self.model, **overrides)


def pipeline_spec(cfg: TrainConfig, unet_config: UNetConfig) -> dict:
    """What a sampler needs to rebuild the model (``pipeline.json``)."""
    unet = unet_config.to_dict()
    unet["gradient_checkpointing"] = False
    return {
        "unet": unet,
        "text_encoder": cfg.text_encoder,
        "resolution": cfg.resolution,
        "schedule": {"kind": cfg.schedule, "num_timesteps": cfg.num_timesteps, "zero_terminal_snr": cfg.zero_terminal_snr},
        "prediction": cfg.prediction,
    }


# TrainConfig fields that decide what the trained model means: the prediction a sampler
# must undo, its schedule, its shape, its text encoder and the image size it learned.
# Resuming with one of them changed is refused unless allowed (``--allow-change``).
MODEL_FIELDS = (
    "model", "model_overrides", "text_encoder", "resolution", "schedule", "num_timesteps", "zero_terminal_snr",
    "prediction",
)  # fmt: skip


def recipe_changes(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """The `MODEL_FIELDS` that ``config`` changes in a checkpoint's ``train_config``: name → (saved, now)."""
    now = json.loads(json.dumps(asdict(config)))  # tuples as lists, as state.json holds them
    return {name: (saved[name], now[name]) for name in MODEL_FIELDS if name in saved and saved[name] != now[name]}


# ----------------------------------------------------------------------------- checkpoint files


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` and flush it to the disk before returning."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _file_record(path: Path) -> dict:
    """Size and SHA-256 of a checkpoint file, recorded in ``state.json`` and checked on resume."""
    from fastdiff.bulk import file_sha256

    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


# ----------------------------------------------------------------------------- optimiser state by name
#
# optimizer.safetensors holds "<name>.<key>" ("mid_attn.blocks.0.attn1.to_k.weight.exp_avg"),
# named as the model's state dict names its entries: a layer that stores several entries in
# one parameter (Attention's to_qkv holds to_q, to_k and to_v) has its optimiser state split
# the same way, so the file does not depend on how a layer fuses its parameters.  Per-element
# state (AdamW's exp_avg, exp_avg_sq: the parameter's shape) splits into the weight's row
# blocks, exactly; shared state (AdamW's step, a scalar) is repeated for each part.
# state.json's "optimizer" holds the param groups, each with the names of its parameters,
# split the same way.  Files of earlier versions are keyed by position (`_by_position`).


def _saved_parts(model: torch.nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Each parameter's name → the state-dict entries it is saved as, [(entry, rows)], in row order.

    A parameter saved under its own name is one entry.  A fused one is saved by its layer's
    state-dict hook as row views of it (`fastdiff.nn.attention`); they are found here by their
    storage, so the split is the layer's own, not a copy of it."""
    saved = model.state_dict()
    by_storage: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, t in saved.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append((key, t))
    parts = {}
    for name, p in model.named_parameters():
        if name in saved:
            parts[name] = _whole(name, p)
            continue
        views = sorted(by_storage.get(p.untyped_storage().data_ptr(), []), key=lambda kt: kt[1].storage_offset())
        rows, found = 0, []
        for key, t in views:
            block = p.detach()[rows : rows + t.shape[0]]
            if (t.data_ptr(), t.shape, t.stride()) != (block.data_ptr(), block.shape, block.stride()):
                break
            found.append((key, t.shape[0]))
            rows += t.shape[0]
        if not found or rows != p.shape[0]:
            raise ValueError(f"parameter {name} is in the model's state dict neither as itself nor as row blocks of it")
        parts[name] = found
    return parts


def _whole(name: str, p: torch.Tensor) -> list[tuple[str, int]]:
    """A parameter saved as itself: one entry of all its rows."""
    return [(name, p.shape[0] if p.ndim else 1)]


def _named_params(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """``opt``'s parameters with their names in ``model``, in the order its state_dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"]]
    if any(id(p) not in names for p in params):
        raise ValueError("the optimizer holds a parameter that is not the model's")
    return [(names[id(p)], p) for p in params]


def _part_shapes(p: torch.Tensor, parts: list[tuple[str, int]]) -> list[tuple[int, ...]]:
    return [(rows, *p.shape[1:]) for _, rows in parts] if len(parts) > 1 else [tuple(p.shape)]


def _split_state(name: str, p: torch.Tensor, state: dict, parts: list[tuple[str, int]]) -> list[dict]:
    """One parameter's optimiser state → the state of each of its state-dict entries."""
    out: list[dict] = [{} for _ in parts]
    for k, v in state.items():
        if torch.is_tensor(v) and v.ndim > 0 and v.shape == p.shape:  # per element: the weight's row blocks
            for part, block in zip(out, v.split([rows for _, rows in parts])):
                part[k] = block
        elif not torch.is_tensor(v) or v.ndim == 0:  # shared (copies: safetensors refuses aliased tensors)
            for part in out:
                part[k] = v.clone() if torch.is_tensor(v) and len(parts) > 1 else v
        else:
            shape = tuple(v.shape)
            raise ValueError(f"optimizer state {k!r} of {name} has shape {shape}: neither the parameter's nor a scalar")
    return out


def _fuse_state(name: str, p: torch.Tensor, states: list[dict], parts: list[tuple[str, int]]) -> dict:
    """The inverse of `_split_state`: a parameter's optimiser state from its entries' states."""
    keys = [key for key, _ in parts]
    if any(s.keys() != states[0].keys() for s in states):
        raise ValueError(f"optimizer.safetensors: {keys} do not hold the same state ({[sorted(s) for s in states]})")
    fused = {}
    for k, first in states[0].items():
        values = [s[k] for s in states]
        if torch.is_tensor(first) and first.ndim > 0:  # per element
            shapes, want = [tuple(v.shape) for v in values], _part_shapes(p, parts)
            if shapes != want:
                raise ValueError(f"optimizer.safetensors: {k} of {keys} has shapes {shapes}, this model's {want}")
            fused[k] = torch.cat(values) if len(values) > 1 else first
        elif all(torch.equal(v, first) if torch.is_tensor(v) else v == first for v in values[1:]):
            fused[k] = first
        else:
            raise ValueError(f"optimizer.safetensors: {k} differs between {keys}, the parts of {name}")
    return fused


def _optimizer_tensors(opt: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser state by state-dict name, as flat tensors (safetensors) + its JSON-able rest."""
    sd = opt.state_dict()
    named, parts = _named_params(model, opt), _saved_parts(model)
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        name, p = named[idx]
        for (key, _), part in zip(parts[name], _split_state(name, p, state, parts[name])):
            for k, v in part.items():
                (tensors if torch.is_tensor(v) else scalars)[f"{key}.{k}"] = v
    groups = [{**g, "params": [key for i in g["params"] for key, _ in parts[named[i][0]]]} for g in sd["param_groups"]]
    return tensors, {"keyed_by": "name", "param_groups": groups, "scalars": scalars}


def _by_position(tensors: dict, meta: dict, names: list[str], parts: dict) -> tuple[dict, dict]:
    """An index-keyed file of earlier versions ("<position>.<key>") keyed by name instead.

    Written before Attention fused its projections, position i is the i-th state-dict entry of
    the parameters in order: to_q, to_k, to_v, to_out… (the order its separate layers were
    registered in).  Written after, it is the i-th parameter.  The count tells which."""
    count = sum(len(g["params"]) for g in meta["param_groups"])
    split = [key for name in names for key, _ in parts[name]]
    if count not in (len(split), len(names)):
        raise ValueError(
            f"optimizer.safetensors holds the state of {count} parameters by position; "
            f"this model has {len(names)} ({len(split)} as its state dict names them)"
        )
    at = split if count == len(split) else names

    def rename(key: str) -> str:
        position, k = key.split(".", 1)
        return f"{at[int(position)]}.{k}"

    groups = [{**g, "params": [at[i] for i in g["params"]]} for g in meta["param_groups"]]
    renamed = {rename(key): v for key, v in tensors.items()}
    return renamed, {"param_groups": groups, "scalars": {rename(key): v for key, v in meta["scalars"].items()}}


def _optimizer_state_dict(
    tensors: dict[str, torch.Tensor], meta: dict, opt: torch.optim.Optimizer, model: torch.nn.Module
) -> dict:
    """``opt``'s state_dict (keyed by position, as torch loads it) from a checkpoint's optimiser
    tensors and state.json's "optimizer": keyed by name, or by position as earlier versions wrote it."""
    named, parts = _named_params(model, opt), _saved_parts(model)
    names = [name for name, _ in named]
    if meta.get("keyed_by") != "name":
        tensors, meta = _by_position(tensors, meta, names, parts)
    saved: dict[str, dict] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        entry, k = key.rsplit(".", 1)
        saved.setdefault(entry, {})[k] = v
    if len(meta["param_groups"]) != len(opt.param_groups):
        raise ValueError(
            f"optimizer.safetensors has {len(meta['param_groups'])} param groups, this run's optimizer "
            f"{len(opt.param_groups)}"
        )
    groups, start = [], 0
    for i, (theirs, group) in enumerate(zip(meta["param_groups"], opt.param_groups)):
        mine = names[start : start + len(group["params"])]
        if theirs["params"] not in ([key for name in mine for key, _ in parts[name]], mine):
            raise ValueError(f"optimizer.safetensors: param group {i} holds other parameters than this run's")
        groups.append({**theirs, "params": list(range(start, start + len(mine)))})
        start += len(mine)
    state = {}
    for idx, (name, p) in enumerate(named):
        # Under its own name: a parameter saved as itself, or a fused one by position (written after the fusing).
        entries = _whole(name, p) if name in saved else parts[name]
        keys = [key for key, _ in entries]
        have = [key for key in keys if key in saved]
        if have and have != keys:
            raise ValueError(f"optimizer.safetensors has state for {have} but not for all of {keys}")
        if have:
            state[idx] = _fuse_state(name, p, [saved.pop(key) for key in keys], entries)
    if saved:
        raise ValueError(f"optimizer.safetensors has state for {sorted(saved)[:3]}…, which this model does not have")
    return {"state": state, "param_groups": groups}


STEP_NAME = re.compile(r"step_(\d+)")
# The files of a checkpoint folder besides state.json, which records their sizes and hashes.
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", PIPELINE_FILE)
STATE_KEYS = ("step", "loss", "train_config", "optimizer")  # what a resume reads from state.json
# Names of unfinished writes: ``.tmp-step_XXXXXXX-PID`` folders and ``.latest-PID`` pointer files.
UNFINISHED = (".tmp-step_*", ".latest-*")


def _step_of(folder: Path) -> int:
    return int(STEP_NAME.fullmatch(folder.name).group(1))


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``step_<digits>`` folders directly inside ``output_dir``, highest step first.

    A link that leads out of ``output_dir`` is not one of them."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    home = out.resolve()
    found = [
        p for p in out.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir() and p.resolve().parent == home
    ]  # fmt: skip
    return sorted(found, key=_step_of, reverse=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it can.

    ``state.json`` (written last) must parse and name the folder's step, and every other
    file must have the size and SHA-256 recorded when it was written: a truncated,
    emptied or overwritten file is caught before anything is loaded.  A checkpoint
    written before sizes and hashes were recorded has its safetensors files parsed instead."""
    try:
        state = json.loads((folder / "state.json").read_text())
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            return f"state.json lacks {missing}"
        if state["step"] != _step_of(folder):
            return f"state.json is for step {state['step']!r}"
        files = state.get("files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: not JSON, not text
        return f"state.json: {type(e).__name__}: {e}"
    for name in CHECKPOINT_FILES:
        try:
            problem = _file_problem(folder / name, files[name]) if files is not None else _parse_problem(folder / name)
        except (OSError, KeyError, TypeError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            return f"{name}: {problem}"
    return None


def _file_problem(path: Path, written: dict) -> str | None:
    """How ``path`` differs from its record ``{"size", "sha256"}`` (None when it does not)."""
    size = path.stat().st_size
    if size != written["size"]:
        return f"{size} bytes, {written['size']} were written"
    if _file_record(path) != written:
        return "not the SHA-256 recorded when it was written"
    return None


def _parse_problem(path: Path) -> str | None:
    """Why a safetensors file of a checkpoint without records does not parse (None when it does)."""
    from safetensors import SafetensorError

    if path.suffix != ".safetensors":
        return None
    try:
        _load_tensors(path)
    except SafetensorError as e:
        return str(e)
    return None


def _pointer_target(out: Path, folders: list[Path]) -> tuple[Path | None, str | None]:
    """The checkpoint folder ``latest`` names, or None and why it is ignored (None when there is no ``latest``)."""
    pointer = out / "latest"
    if not pointer.exists():
        return None, None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"ignoring {pointer}: unreadable ({e})"
    if STEP_NAME.fullmatch(name) and out / name in folders:
        return out / name, None
    return None, f"ignoring {pointer}: it names {name!r}, which is not a step_ folder inside {out}"


@dataclass
class CheckpointSearch:
    """What `find_checkpoint` found: the folder to resume from and what it passed over."""

    path: Path | None  # the newest checkpoint that loads (None: none does, or there is none)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why): "model.safetensors: 0 bytes, …"
    warning: str | None = None  # why ``latest`` was ignored


def find_checkpoint(output_dir: str | os.PathLike) -> CheckpointSearch:
    """The checkpoint a resume starts from: walking back from the newest to the newest that loads.

    The newest is the folder ``latest`` names (a ``step_`` folder inside ``output_dir``;
    anything else is ignored with a warning), else the highest step.  Folders above
    the one ``latest`` names are passed over: a killed write left them before ``latest``
    moved, or an earlier run left them (``resume=False``).  Each candidate is checked by
    `checkpoint_problem`."""
    out = Path(output_dir)
    folders = checkpoint_folders(out)
    target, warning = _pointer_target(out, folders)
    search = CheckpointSearch(None, warning=warning)
    if target is not None:
        newer = [f for f in folders if _step_of(f) > _step_of(target)]
        search.skipped += [(f, f"newer than {target.name}, which latest names") for f in newer]
        folders = folders[len(newer) :]
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            search.path = folder
            break
        search.skipped.append((folder, problem))
    return search


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder a resume in ``output_dir`` starts from (None when none loads)."""
    return find_checkpoint(output_dir).path


def remove_unfinished(output_dir: str | os.PathLike) -> list[str]:
    """Delete what killed checkpoint writes left in ``output_dir``; returns their names.

    One run trains a folder at a time, so every temporary name there is a leftover."""
    out, removed = Path(output_dir), []
    for pattern in UNFINISHED:
        for leftover in sorted(out.glob(pattern)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            removed.append(leftover.name)
    return removed


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Trains ``UNet`` on a captioned dataset; see the module docstring for the recipe.

    ``text_encoder`` may be any `fastdiff.text.TextEncoder`; by default it is loaded
    from ``config.text_encoder``.  ``resume=True`` continues from the newest checkpoint
    in ``config.output_dir`` that loads (`find_checkpoint`); a checkpoint whose
    `MODEL_FIELDS` differ from ``config`` is refused unless ``allow_changes`` names them.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        *,
        text_encoder=None,
        device: str | torch.device | None = None,
        resume: bool = True,
        allow_changes: tuple[str, ...] | list[str] = (),
    ):
        from fastdiff.text import PromptCache, load_text_encoder

        self.config = cfg = config
        self.out = check_out_dir(cfg.output_dir, "output_dir")
        unknown = sorted(set(allow_changes) - set(MODEL_FIELDS))
        if isinstance(allow_changes, str) or unknown:
            raise ValueError(f"allow_changes must be a list of {MODEL_FIELDS}, got {allow_changes!r}")
        self.dataset = dataset
        if len(dataset) == 0:
            raise ValueError("dataset is empty" + (f" ({report(dataset.skipped)})" if getattr(dataset, "skipped", None) else ""))
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if self.world_size > 1 and not self.SUPPORTS_DDP:
            raise ValueError(f"{type(self).__name__} trains in one process only; run it without torchrun")
        if cfg.batch_size < self.world_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be >= the number of processes {self.world_size}")
        # Decided before anything is built: a refused resume (or a folder in use) costs nothing.
        self._lock: LockFile | None = None
        self.checkpoint: Path | None = self._agreed_checkpoint(set(allow_changes), resume)
        try:  # a trainer that fails to build gives the folder up at once (its traceback may outlive it)
            if self.rank == 0:
                for name in remove_unfinished(self.out):
                    print(f"removed {self.out / name}: a checkpoint write that was killed", file=sys.stderr)
            self.device = distributed.device(device)
            if text_encoder is None:
                text_encoder = load_text_encoder(cfg.text_encoder, self.device)
            self.text_encoder = text_encoder
            self.prompts = PromptCache(self.text_encoder)
            self.unet_config = cfg.unet_config(self.text_encoder.dim, self.text_encoder.pooled_dim)
            torch.manual_seed(cfg.seed)  # the initial weights
            self.model = self.build_model().to(self.device)
            downscale = getattr(self.model, "downscale", 1)  # a UNet's H and W are multiples of it
            if cfg.resolution % downscale:
                raise ValueError(f"resolution must be a multiple of {downscale} for this UNet, got {cfg.resolution}")
            if cfg.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            self.ema = self.build_model().to(self.device).requires_grad_(False)
            self.ema.load_state_dict(self.model.state_dict())
            self.ema.eval()
            # The module that trains: DDP around the model when there are several processes.
            self.net = self._wrap_ddp(self.model) if self.world_size > 1 else self.model
            self._fallback: dict | None = None  # a recent batch of this rank, for a step where its slice is empty
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
            )
            sched = make_schedule(cfg.schedule, cfg.num_timesteps, zero_terminal_snr=cfg.zero_terminal_snr)
            self.schedule = sched
            self.alphas_cumprod = sched.alphas_cumprod.to(self.device, torch.float32)
            self.step = 0
            self.skipped: list[Skipped] = list(getattr(dataset, "skipped", []))
            self.last_loss = float("nan")
            self._perm_epoch, self._perm = -1, None
            if self.checkpoint is not None:
                self.load(self.checkpoint)
        except BaseException:
            self.release()
            raise

    # -- what a subclass (an application's trainer) may change --

    DEFAULTS: dict = {}  # TrainConfig fields this task changes (the command line still overrides them)
    DDP_FIND_UNUSED_PARAMETERS: bool = False  # True if some parameters get no gradient in a step
    # False for a subclass that overrides ``_batch`` or ``noised`` without the
    # distributed ``rows`` slicing: it then refuses to start under torchrun.
    SUPPORTS_DDP: bool = True

    @classmethod
    def open_dataset(cls, spec: str | None, config: TrainConfig) -> Dataset:
        """The dataset named by ``fastdiff train --data`` (None: the task's default)."""
        from fastdiff.data import open_dataset

        return open_dataset(spec or "shapes", config.resolution, config.seed)

    def build_model(self) -> torch.nn.Module:
        """A fresh network (called twice: the trained weights and their EMA)."""
        return UNet(self.unet_config)

    def model_kwargs(self, batch: dict, drop: list[bool]) -> dict:
        """The conditioning arguments of ``model(x_t, t, **kwargs)``; ``drop[b]``: train b unconditionally."""
        texts = ["" if d else txt for d, txt in zip(drop, batch["text"])]
        context, pooled = self.prompts.encode(texts, self.device)
        return {"context": context, "pooled": pooled}

    def noised(self, x0: torch.Tensor, t: torch.Tensor, g: torch.Generator, batch: dict, rows: tuple[int, int] | None):
        """(x_t, t, target) of one micro-batch: the forward process at t with noise drawn from ``g``.

        rows = (offset, N): distributed, the batch is rows offset… of a global micro-batch of N.
        A subclass may draw other noise (or change t); it then sets ``SUPPORTS_DDP = False``
        unless it slices its draws by ``rows`` too.
        """
        cfg = self.config
        if rows is None:  # the kernel draws the noise from g itself
            x_t, _, target = ops.training_target(x0, t, self.alphas_cumprod, prediction=cfg.prediction, generator=g)
            return x_t, t, target
        offset, N = rows  # the per-example Philox keys the kernel would draw for all N; the kernel draws from ours
        keys = ops.noising.draw_keys(N, "cpu", g)[offset : offset + x0.shape[0]].to(self.device)
        x_t, _, target = ops.training_target(x0, t, self.alphas_cumprod, prediction=cfg.prediction, keys=keys)
        return x_t, t, target

    def pipeline_spec(self) -> dict:
        """``pipeline.json``: what a sampler needs to rebuild the model."""
        return pipeline_spec(self.config, self.unet_config)

    # -- randomness and data order: pure functions of (seed, micro-batch index) --

    def _generator(self, micro: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + micro)

    def _indices(self, micro: int) -> list[int]:
        n, B = len(self.dataset), self.config.batch_size
        out = []
        for pos in range(micro * B, (micro + 1) * B):
            epoch = pos // n
            if epoch != self._perm_epoch:
                g = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
                self._perm, self._perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
            out.append(self._perm[pos % n])
        return out

    def _batch(self, micro: int) -> dict:
        return collate([self.dataset[i] for i in self._indices(micro)])

    def _autocast(self):
        mp = self.config.mixed_precision
        use_bf16 = mp == "bf16" or (mp == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # -- one step --

    def _micro_loss(self, batch: dict, micro: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The loss of ``batch``.  rows = (offset, N): the batch is rows offset… of a global
        micro-batch of N examples (distributed); its random draws are that slice of the
        draws for all N."""
        cfg = self.config
        g = self._generator(micro)
        x0 = batch["image"].to(self.device)
        if cfg.channels_last and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        B = x0.shape[0]
        offset, N = rows if rows is not None else (0, B)
        mine = slice(offset, offset + B)
        t = torch.randint(0, cfg.num_timesteps, (N,), generator=g)[mine].to(self.device)
        drop = (torch.rand(N, generator=g) < cfg.cond_dropout)[mine].tolist()
        kwargs = self.model_kwargs(batch, drop)
        x_t, t, target = self.noised(x0, t, g, batch, rows)
        weight = None
        if cfg.min_snr_gamma is not None:
            weight = ops.min_snr_weight(t, self.alphas_cumprod, cfg.min_snr_gamma, cfg.prediction)
        with self._autocast():
            pred = self.net(x_t, t, **kwargs)
        return ops.diffusion_loss(pred, target, weight)

    def _lr(self, step: int) -> float:
        warm = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warm) if warm > 0 else self.config.lr

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    def train_step(self) -> float:
        """One optimiser step; returns its loss.  Raises `TrainingDiverged` on a non-finite loss."""
        cfg = self.config
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.world_size > 1:
            return self._distributed_step()
        total, micro_done = 0.0, 0
        for a in range(cfg.grad_accum):
            micro = self.step * cfg.grad_accum + a
            batch = self._batch(micro)
            self.skipped.extend(batch["skipped"])
            if len(batch["text"]) == 0:
                continue
            loss = self._micro_loss(batch, micro)
            if not torch.isfinite(loss):
                raise TrainingDiverged(self._diverged_message(loss.item()))
            (loss / cfg.grad_accum).backward()
            total += loss.item()
            micro_done += 1
        if micro_done == 0:
            raise RuntimeError(f"every example of step {self.step} was unreadable:\n{report(self.skipped)}")
        self.last_loss = total / micro_done
        return self._apply_update()

    def _apply_update(self) -> float:
        """Clip, step the optimiser, update the EMA (rank 0 only); returns the step's loss."""
        if self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            if not torch.isfinite(norm):
                raise TrainingDiverged(self._diverged_message(float("nan"), "gradient norm"))
        self.optimizer.step()
        self.step += 1
        if self.rank == 0:
            self._update_ema()
        return self.last_loss

    # -- distributed: DDP over contiguous slices of each global micro-batch --

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.DDP_FIND_UNUSED_PARAMETERS)

    def _rank_batch(self, micro: int) -> dict:
        """This rank's contiguous slice of the global micro-batch (split as evenly as possible)."""
        indices, W = self._indices(micro), self.world_size
        lo, hi = self.rank * len(indices) // W, (self.rank + 1) * len(indices) // W
        return collate([self.dataset[i] for i in indices[lo:hi]])

    def _distributed_step(self) -> float:
        cfg = self.config
        micros = [self.step * cfg.grad_accum + a for a in range(cfg.grad_accum)]
        batches = [self._rank_batch(m) for m in micros]
        # One collective per step: every rank's readable count and skipped examples of every micro-batch.
        gathered = distributed.all_gather_object([(len(b["text"]), b["skipped"]) for b in batches])
        counts = [[per_rank[a][0] for per_rank in gathered] for a in range(cfg.grad_accum)]
        for a in range(cfg.grad_accum):
            for per_rank in gathered:
                self.skipped.extend(per_rank[a][1])
        live = [a for a in range(cfg.grad_accum) if sum(counts[a]) > 0]
        if not live:
            raise RuntimeError(f"every example of step {self.step} was unreadable:\n{report(self.skipped)}")
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in live:
            n, N = counts[a][self.rank], sum(counts[a])
            offset = sum(counts[a][: self.rank])
            if n > 0:
                self._fallback = batches[a]
                loss = self._micro_loss(batches[a], micros[a], (offset, N))
                scale = n / N
                total += loss.detach().double() * scale
            else:  # DDP needs every rank in the backward: a zero-weighted pass over a batch we have
                loss = self._micro_loss(self._fallback_batch(), micros[a], None)
                scale = 0.0
            # DDP averages gradients over W ranks: W·n/N makes that the mean over the N examples
            # (and 1/grad_accum as in the single-process step).  Only the last backward all-reduces.
            sync = contextlib.nullcontext() if a == live[-1] else self.net.no_sync()
            with sync:
                (loss * (scale * self.world_size / cfg.grad_accum)).backward()
        loss = distributed.all_reduce_sum(total).item() / len(live)
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(loss))
        self.last_loss = loss
        return self._apply_update()

    def _fallback_batch(self) -> dict:
        if self._fallback is None:
            for i in range(len(self.dataset)):
                batch = collate([self.dataset[i]])
                if batch["text"]:
                    self._fallback = batch
                    break
            else:
                raise RuntimeError(f"no readable example in the dataset:\n{report(self.skipped)}")
        return self._fallback

    def _diverged_message(self, value: float, what: str = "loss") -> str:
        last = self.checkpoint
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        return (
            f"training stopped: the {what} became {value} at step {self.step + 1}; {keep}. "
            "Lower the learning rate (--lr) or enable gradient clipping (--grad-clip), then resume."
        )

    # -- the loop --

    def train(self) -> Path:
        """Train to ``config.steps``; returns the final checkpoint folder."""
        cfg = self.config
        if self.rank == 0 and self._lock is None:  # a new folder, or a second call (the first gave it up)
            self._hold_output_dir()
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", skipped=len(self.skipped), refresh=False)
                if cfg.sample_every and self.step % cfg.sample_every == 0 and cfg.sample_prompts and self.rank == 0:
                    self.sample_grid()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
            if self.skipped and self.rank == 0:
                print(report(self.skipped))
            return self.checkpoint if self.checkpoint is not None else self.save()
        finally:
            if bar is not None:
                bar.close()
            self.release()

    # -- checkpoints --

    def save(self) -> Path:
        """Write ``step_XXXXXXX/`` atomically, point ``latest`` at it, prune old ones.

        Distributed: rank 0 writes, then every rank waits for it (a barrier)."""
        if self.world_size > 1:
            final = self._write_checkpoint() if self.rank == 0 else self.out / f"step_{self.step:07d}"
            distributed.barrier()
        else:
            final = self._write_checkpoint()
        self.checkpoint = final
        return final

    def _write_checkpoint(self) -> Path:
        """Every file is fsynced before the folder is renamed into place, the folder's rename
        before ``latest`` moves, and ``latest`` before old folders go: a kill or a power loss
        at any point leaves the previous checkpoint loadable and named."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.step:07d}"
        final = self.out / name
        tmp = self.out / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        opt_tensors, opt_meta = _optimizer_tensors(self.optimizer, self.model)
        _save_tensors(tmp / "model.safetensors", self.model.state_dict())
        _save_tensors(tmp / "ema.safetensors", self.ema.state_dict())
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        _write_json(tmp / PIPELINE_FILE, self.pipeline_spec())
        state = {
            "step": self.step,
            "loss": self.last_loss,
            "skipped": len(self.skipped),
            "train_config": asdict(cfg),
            "optimizer": opt_meta,
            "files": {f: _file_record(tmp / f) for f in CHECKPOINT_FILES},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_json(tmp / "state.json", state)  # written last: its presence marks a complete folder
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        replace_durably(tmp, final)
        pointer_tmp = self.out / f".latest-{os.getpid()}"
        _write_text(pointer_tmp, name)
        replace_durably(pointer_tmp, self.out / "latest")
        older = [f for f in checkpoint_folders(self.out) if _step_of(f) < self.step]
        for old in older[cfg.keep_checkpoints - 1 :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _agreed_checkpoint(self, allowed: set[str], resume: bool) -> Path | None:
        """Rank 0 takes the output folder (`_hold_output_dir`) and decides the checkpoint to resume from
        (`_pick_checkpoint`; None without ``resume``); every rank gets its answer or its error (a rank
        left waiting for an answer would wait until the process group times out)."""
        answer = None
        if self.rank == 0:
            try:
                if self.out.is_dir():  # else nothing is there to guard yet: `train` takes it
                    self._hold_output_dir()
                answer = self._pick_checkpoint(allowed) if resume else None
            except (ValueError, OSError) as e:
                answer = e
        answer = distributed.broadcast_object(answer)
        if isinstance(answer, Exception):
            self.release()  # a refused trainer holds nothing
            raise answer
        return answer

    def _hold_output_dir(self) -> None:
        """Lock ``output_dir`` (``.lock`` in it; from the constructor on where the folder exists, else from
        `train` on) until `train` returns or this trainer is collected: a second
        trainer there, in this process or another, is refused with `LockHeld` (one line naming the holder)
        instead of deleting the first one's checkpoint in progress (`remove_unfinished`) and interleaving
        its own.  The lock dies with its process, so a killed run leaves none behind."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = LockFile(self.out / ".lock", f"output_dir {str(self.out)!r}").acquire()
        weakref.finalize(self, self._lock.release)

    def release(self) -> None:
        """Give the output folder up (`train` does when it returns); another trainer may then use it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _pick_checkpoint(self, allowed: set[str]) -> Path | None:
        """`find_checkpoint`, said aloud; a folder of checkpoints none of which loads, or a
        recipe change not in ``allowed``, is refused."""
        search = find_checkpoint(self.out)
        if search.warning:
            print(f"warning: {search.warning}", file=sys.stderr)
        for folder, why in search.skipped:
            print(f"warning: skipped {folder}: {why}", file=sys.stderr)
        if search.path is None:
            if search.skipped:
                said = "; ".join(f"{folder.name}: {why}" for folder, why in search.skipped)
                raise ValueError(
                    f"no checkpoint in output_dir {str(self.out)!r} loads ({said}); "
                    "move them away or start afresh (--no-resume)"
                )
            return None
        state = json.loads((search.path / "state.json").read_text())
        changes = {k: v for k, v in recipe_changes(state["train_config"], self.config).items() if k not in allowed}
        if changes:
            said = ", ".join(f"{k} from {old!r} to {new!r}" for k, (old, new) in changes.items())
            flags = " ".join(f"--allow-change {k}" for k in changes)
            raise ValueError(
                f"resuming {search.path} would change {said}, which changes what the model means; "
                f"use another --output-dir, or allow it ({flags}; allow_changes={sorted(changes)})"
            )
        print(f"resuming from {search.path} (step {state['step']} of {self.config.steps})")
        return search.path

    def load(self, path: str | os.PathLike) -> None:
        """Restore weights, EMA, optimiser and step from a checkpoint folder."""
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        try:
            self.model.load_state_dict(_load_tensors(path / "model.safetensors"))
            self.ema.load_state_dict(_load_tensors(path / "ema.safetensors"))
            tensors = _load_tensors(path / "optimizer.safetensors")
            opt = _optimizer_state_dict(tensors, state["optimizer"], self.optimizer, self.model)
            self.optimizer.load_state_dict(opt)
        except (RuntimeError, ValueError, KeyError) as e:  # another model's weights (another task, shape or encoder)
            said = " ".join(str(e).split())
            raise ValueError(f"checkpoint {path} does not fit this run's model: {said[:300]}") from e
        self.step = int(state["step"])
        self.last_loss = float(state["loss"])

    # -- samples --

    def sample_grid(self) -> Path:
        """Sample ``config.sample_prompts`` with the EMA weights; saves ``samples/step_XXXXXXX.png``."""
        from fastdiff.pipelines import Text2Image, make_grid

        pipe = Text2Image(self.ema, self.text_encoder, self.pipeline_spec(), self.prompts)
        images = pipe(list(self.config.sample_prompts), steps=self.config.sample_steps, seeds=0, progress=False)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, cols=min(8, len(images))).save(path)
        return path


def train(config: TrainConfig | None = None, dataset: Dataset | None = None, **kwargs) -> Path:
    """Train a model: ``fastdiff.train(output_dir="runs/x", steps=1000)``; the dataset defaults to shapes.

    Keyword arguments are `TrainConfig` fields (when ``config`` is None) plus
    ``text_encoder``, ``device``, ``resume`` and ``allow_changes`` for the `Trainer`.  Returns the final
    checkpoint folder.
    """
    from fastdiff.data import ShapesDataset

    trainer_kw = {k: kwargs.pop(k) for k in ("device", "resume", "allow_changes") if k in kwargs}
    if "text_encoder" in kwargs and not isinstance(kwargs["text_encoder"], str):
        trainer_kw["text_encoder"] = kwargs.pop("text_encoder")
    if config is None:
        config = TrainConfig(**kwargs)
    elif kwargs:
        raise TypeError("give either config or TrainConfig fields as keywords, not both")
    if dataset is None:
        dataset = ShapesDataset(resolution=config.resolution, seed=config.seed)
    return Trainer(config, dataset, **trainer_kw).train()
