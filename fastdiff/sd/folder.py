"""Reading a diffusers Stable Diffusion folder: its index, its components' configs and safetensors weights.

    <folder>/model_index.json                 {"unet": ["diffusers", "UNet2DConditionModel"], ...}
    <folder>/unet/config.json                 + diffusion_pytorch_model[.fp16].safetensors
    <folder>/vae/config.json                  + diffusion_pytorch_model[.fp16].safetensors
    <folder>/text_encoder/config.json         + model[.fp16].safetensors
    <folder>/tokenizer/                       vocab.json + merges.txt, or tokenizer.json
    <folder>/scheduler/scheduler_config.json
    SDXL also: <folder>/text_encoder_2/ (CLIPTextModelWithProjection) and <folder>/tokenizer_2/

Weights come from safetensors files only, whole or sharded (``*.safetensors.index.json``).
A component whose weights exist only as pickle files (``.bin``, ``.ckpt``, ...) is refused
without opening them: unpickling can run arbitrary code.  Every error names the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MODEL_INDEX = "model_index.json"
# The components a text-to-image folder needs, and the classes fastdiff reads for each (None: any).
COMPONENTS: dict[str, tuple[str, ...] | None] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": None,  # any class `fastdiff.sd.scheduler` maps
}
# SDXL's (Podell et al. 2023) second text encoder, the projected one, and its tokenizer.
SDXL_COMPONENTS: dict[str, tuple[str, ...] | None] = {
    **COMPONENTS,
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
    "text_encoder_2": "model",
}  # fmt: skip
DEFAULT_VARIANT = "fp16"  # read when a component has no full-precision file
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder with a ``model_index.json``: a diffusers pipeline, not a fastdiff one."""
    return (Path(path) / MODEL_INDEX).is_file()


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; a missing or unreadable file raises naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def is_sdxl(index: dict) -> bool:
    """An SDXL pipeline's ``model_index.json``: two text encoders, or an XL class name."""
    return "text_encoder_2" in index or "XL" in index.get("_class_name", "")


def read_model_index(root: str | os.PathLike) -> dict:
    """``model_index.json``, checked: an SD 1.x/2.x or SDXL pipeline with every component fastdiff needs present."""
    root = Path(root)
    file = root / MODEL_INDEX
    index = read_json(file)
    name = index.get("_class_name", "")
    components, kind = COMPONENTS, "a Stable Diffusion"
    if is_sdxl(index):
        if index.get("requires_aesthetics_score") or index.get("text_encoder", [None, None]) in (None, [None, None]):
            raise ValueError(f"{file}: {name or 'this pipeline'} is an SDXL refiner (aesthetic-score time ids, "
                             "one text encoder), which fastdiff does not load (SDXL base folders load)")  # fmt: skip
        components, kind = SDXL_COMPONENTS, "an SDXL"
    for component, classes in components.items():
        entry = index.get(component)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise FileNotFoundError(f"{file}: no {component} ({kind} folder needs {', '.join(components)})")
        if classes is not None and entry[1] not in classes:
            raise ValueError(f"{file}: {component} is a {entry[1]}; fastdiff reads {' or '.join(classes)}")
        if not (root / component).is_dir():
            raise FileNotFoundError(f"{root / component}: missing (listed in {MODEL_INDEX})")
    return index


def _candidates(stem: str, variant: str | None) -> list[str]:
    if variant is None:
        return [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    return [f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"]


def find_weights(folder: Path, stem: str, variant: str | None = None) -> tuple[Path, str | None]:
    """The safetensors file (or shard index) of a component, and its variant.

    ``variant`` None: ``<stem>.safetensors``, else the fp16 variant ``<stem>.fp16.safetensors``;
    a variant name: that variant only.  Pickle files are never chosen: a folder that has
    weights only in pickle form raises naming the file.
    """
    tries = [variant] if variant is not None else [None, DEFAULT_VARIANT]
    for v in tries:
        for name in _candidates(stem, v):
            if (folder / name).is_file():
                return folder / name, v
    pickles = sorted(p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{pickles[0]}: pickle weights are not loaded (unpickling can run code); convert them to safetensors"
        )
    wanted = " or ".join(_candidates(stem, v)[0] for v in tries)
    raise FileNotFoundError(f"{folder}: no {wanted}")


def shard_files(file: Path) -> list[Path]:
    """The safetensors files behind ``file``: itself, or every shard a ``*.safetensors.index*.json`` lists."""
    if not file.name.endswith(".json"):
        return [file]
    weight_map = read_json(file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{file}: no weight_map")
    return [file.parent / name for name in dict.fromkeys(weight_map.values())]


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or of all shards a ``*.safetensors.index*.json`` lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for shard in shard_files(file):
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: no such file (listed in {file.name})")
        try:
            state.update(load_file(str(shard)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{shard}: not a readable safetensors file ({e})") from None
    return state


def read_files(root: Path, weights: list[Path], sdxl: bool = False) -> list[Path]:
    """Every file a load of the folder ``root`` reads, given the weights files it chose: ``model_index.json``,
    the scheduler's and each model's config, every shard of ``weights`` and the tokenizers' files."""
    models = [c for c in WEIGHT_STEMS if sdxl or c != "text_encoder_2"]
    configs = [root / MODEL_INDEX, root / "scheduler" / "scheduler_config.json"]
    configs += [root / component / "config.json" for component in models]
    tokenizers = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
    tokenizer = [p for t in tokenizers for p in sorted((root / t).iterdir()) if p.is_file()]
    return configs + [shard for file in weights for shard in shard_files(file)] + tokenizer


def load_component(root: Path, component: str, variant: str | None = None) -> tuple[dict, dict, Path]:
    """(config, tensors, weights file) of the diffusers model ``component`` (unet or vae)."""
    folder = root / component
    config = read_json(folder / "config.json")
    file, _ = find_weights(folder, WEIGHT_STEMS[component], variant)
    return config, load_safetensors(file), file
