"""The optimiser state of a checkpoint: saved by name in the state dict's split form, read back
into fused layers, and read from the position-keyed files of earlier versions.

Earlier versions wrote each parameter's AdamW state under its position in the optimiser
(`position_keyed`, their writer).  Two layouts of such files exist: written before Attention
fused its projections (separate to_q, to_k, to_v layers: `OldAttention` rebuilds that module
here) and after (to_qkv, or to_q and to_kv).  A run resumed from any of them must end with
the bytes of the uninterrupted run."""
import json

import pytest
import torch
import torch.nn.functional as F
from test_training import HashEncoder, config, states, trainer
from torch import nn

from fastdiff import training
from fastdiff.data import ShapesDataset
from fastdiff.nn import unet as unet_module
from fastdiff.nn.attention import Attention
from fastdiff.ops.flash_attention import attention


pytestmark = pytest.mark.usefixtures("reference_ops")


def position_keyed(opt, model=None):
    """The optimiser-state writer of earlier versions: "<position>.<key>", positions as torch numbers them."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


class OldAttention(nn.Module):
    """Attention before its projections were fused: to_q, to_k, to_v, to_out registered in this order,
    the same initial weights (nn.Linear fills rows in order) and the same forward."""

    check_inputs = True  # set by the UNet as on Attention; the forward below checks nothing anyway

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, out_bias=True):
        super().__init__()
        inner = heads * dim_head
        self.context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)

    def forward(self, x, context=None):
        B, L, _ = x.shape
        H, D = self.heads, self.dim_head
        if context is None:
            w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = F.linear(x, w_qkv).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.to_q(x).view(B, L, H, D).transpose(1, 2)
            w_kv = torch.cat([self.to_k.weight, self.to_v.weight])
            k, v = F.linear(context, w_kv).view(B, context.shape[1], 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = attention(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(B, L, H * D))


def old_unet(monkeypatch):
    """Build UNets with `OldAttention` (until the returned undo is called)."""
    monkeypatch.setattr(unet_module, "Attention", OldAttention)
    return monkeypatch.undo


def assert_same_files(got, want):
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def attention_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]


# ----------------------------------------------------------------------------- the format


def test_the_state_is_saved_by_state_dict_name_and_fused_weights_split_into_their_rows(tmp_path, monkeypatch):
    t = trainer(config(tmp_path, steps=2))
    t.train()
    ckpt = training.latest_checkpoint(tmp_path)
    saved = training._load_tensors(ckpt / "optimizer.safetensors")
    buffers = {name for name, _ in t.model.named_buffers()}
    entries = [name for name in t.model.state_dict() if name not in buffers]
    assert sorted(saved) == sorted(f"{e}.{k}" for e in entries for k in ("step", "exp_avg", "exp_avg_sq"))
    layers = attention_layers(t.model)
    assert {bool(m.context_dim != m.query_dim) for _, m in layers} == {False, True}  # self- and cross-attention
    for prefix, m in layers:
        fused = m.to_qkv.weight if m.context_dim == m.query_dim else m.to_kv.weight
        st = t.optimizer.state[fused]
        parts = ("to_q", "to_k", "to_v") if m.context_dim == m.query_dim else ("to_k", "to_v")
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.cat([saved[f"{prefix}.{part}.weight.{k}"] for part in parts]), st[k])
        assert all(torch.equal(saved[f"{prefix}.{part}.weight.step"], st["step"]) for part in parts)
    # the param group lists the names in the order the unfused module registered its parameters
    group = json.loads((ckpt / "state.json").read_text())["optimizer"]["param_groups"][0]
    old_unet(monkeypatch)
    assert group["params"] == [name for name, _ in t.build_model().named_parameters()]


def test_fused_state_round_trips_and_equals_separate_layers_stepped_alone():
    """Two param groups, self- and cross-attention: the fused layers' AdamW state written and read
    back is the same; written by the separate layers of old (stepped on the same gradients), it is
    read as their rows concatenated."""
    torch.manual_seed(0)
    new = nn.ModuleDict({"self": Attention(32, heads=1, dim_head=32), "cross": Attention(32, 8, heads=1, dim_head=32)})
    torch.manual_seed(0)
    old = nn.ModuleDict(
        {"self": OldAttention(32, heads=1, dim_head=32), "cross": OldAttention(32, 8, heads=1, dim_head=32)}
    )
    assert all(torch.equal(new.state_dict()[k], v) for k, v in old.state_dict().items())

    def adamw(model):
        out = [p for n, p in model.named_parameters() if "to_out" in n]
        rest = [p for n, p in model.named_parameters() if "to_out" not in n]
        return torch.optim.AdamW([{"params": rest}, {"params": out, "lr": 0.5}], lr=0.1)

    opt_new, opt_old = adamw(new), adamw(old)
    for _ in range(2):
        grads = {k: torch.randn_like(v) for k, v in old.state_dict().items()}
        for name, p in old.named_parameters():
            p.grad = grads[name]
        for prefix, m in new.items():
            if m.context_dim == m.query_dim:
                m.to_qkv.weight.grad = torch.cat([grads[f"{prefix}.to_{x}.weight"] for x in "qkv"])
            else:
                m.to_q.weight.grad = grads[f"{prefix}.to_q.weight"]
                m.to_kv.weight.grad = torch.cat([grads[f"{prefix}.to_{x}.weight"] for x in "kv"])
            m.to_out.weight.grad, m.to_out.bias.grad = grads[f"{prefix}.to_out.weight"], grads[f"{prefix}.to_out.bias"]
        opt_new.step()
        opt_old.step()
    want = opt_new.state_dict()
    for tensors, meta in (training._optimizer_tensors(opt_new, new), position_keyed(opt_old)):
        meta = json.loads(json.dumps(meta))  # through state.json
        fresh = adamw(new)
        fresh.load_state_dict(training._optimizer_state_dict(tensors, meta, fresh, new))
        got = fresh.state_dict()
        assert got["param_groups"] == json.loads(json.dumps(want["param_groups"]))  # betas a list, as before
        assert got["state"].keys() == want["state"].keys()
        for i, st in want["state"].items():
            assert all(torch.equal(got["state"][i][k], v) for k, v in st.items())


def test_optimizer_files_that_do_not_fit_are_refused_in_one_line():
    model = nn.ModuleDict({"a": Attention(32, heads=1, dim_head=32)})
    opt = torch.optim.AdamW(model.parameters())
    model.a.to_qkv.weight.grad = torch.ones_like(model.a.to_qkv.weight)
    opt.step()
    tensors, meta = training._optimizer_tensors(opt, model)

    def refused(tensors, meta, match):
        with pytest.raises(ValueError, match=match) as e:
            training._optimizer_state_dict(tensors, meta, opt, model)
        assert "\n" not in str(e.value)

    partial = {k: v for k, v in tensors.items() if not k.startswith("a.to_k.")}
    refused(partial, meta, r"state for \['a.to_q.weight', 'a.to_v.weight'\] but not for all of")
    odd = {**tensors, "a.to_k.weight.exp_avg": torch.zeros(3, 32)}
    refused(odd, meta, r"exp_avg of \['a.to_q.weight', 'a.to_k.weight', 'a.to_v.weight'\] has shapes")
    refused({**tensors, "b.weight.exp_avg": torch.zeros(1)}, meta, r"state for \['b.weight'\]…, which this model")
    other = {**meta, "param_groups": [{**meta["param_groups"][0], "params": ["a.to_out.weight"]}]}
    refused(tensors, other, "param group 0 holds other parameters than this run's")
    _, by_position = position_keyed(opt)
    refused({}, {**by_position, "param_groups": [{"params": [0, 1]}]}, "holds the state of 2 parameters by position")


# ----------------------------------------------------------------------------- resume, byte for byte


def test_resume_from_a_checkpoint_written_before_attention_was_fused(tmp_path, monkeypatch):
    # Gradient clipping off: its global norm sums per-tensor norms, whose rounding depends on how
    # the weights are grouped, so only without it do the old and the fused layers train to the same bits.
    full = trainer(config(tmp_path / "full", grad_clip=None))
    full.train()
    undo = old_unet(monkeypatch)
    monkeypatch.setattr(training, "_optimizer_tensors", position_keyed)
    old = trainer(config(tmp_path / "split", steps=2, grad_clip=None))
    assert any(isinstance(m, OldAttention) for m in old.model.modules())
    old.train()
    undo()
    # the old run is the fused run, up to its checkpoint
    step2 = training._load_tensors(tmp_path / "full" / "step_0000002" / "model.safetensors")
    assert all(torch.equal(step2[k], v) for k, v in old.model.state_dict().items())
    saved = training._load_tensors(tmp_path / "split" / "step_0000002" / "optimizer.safetensors")
    assert "0.exp_avg" in saved and max(int(k.split(".")[0]) for k in saved) + 1 > len(list(full.model.parameters()))
    resumed = trainer(config(tmp_path / "split", grad_clip=None))
    assert resumed.step == 2
    resumed.train()
    assert all(torch.equal(a, b) for a, b in zip(states(full), states(resumed)))
    assert_same_files(tmp_path / "split" / "step_0000004", tmp_path / "full" / "step_0000004")


def test_resume_from_a_position_keyed_checkpoint_of_fused_layers(tmp_path, monkeypatch):
    full = trainer(config(tmp_path / "full"))
    full.train()
    monkeypatch.setattr(training, "_optimizer_tensors", position_keyed)
    trainer(config(tmp_path / "split", steps=2)).train()
    monkeypatch.undo()
    resumed = trainer(config(tmp_path / "split"))
    assert resumed.step == 2
    resumed.train()
    assert all(torch.equal(a, b) for a, b in zip(states(full), states(resumed)))
    assert_same_files(tmp_path / "split" / "step_0000004", tmp_path / "full" / "step_0000004")


class AttentionOnly(training.Trainer):
    """Trains the self-attention layers only, as the video-layout task trains a part of its model."""

    def build_model(self):
        model = super().build_model()
        for name, p in model.named_parameters():
            p.requires_grad_(".attn1." in name)
        return model


def test_a_partly_frozen_model_saves_the_state_of_what_trains_and_resumes_exactly(tmp_path):
    def run(out, **kw):
        return AttentionOnly(config(out, **kw), ShapesDataset(resolution=16, length=7), text_encoder=HashEncoder())

    full = run(tmp_path / "full")
    full.train()
    run(tmp_path / "split", steps=2).train()
    saved = training._load_tensors(tmp_path / "split" / "step_0000002" / "optimizer.safetensors")
    assert {k.rsplit(".", 2)[0].split(".attn1.")[1] for k in saved} == {"to_q", "to_k", "to_v", "to_out"}
    resumed = run(tmp_path / "split")
    resumed.train()
    assert all(torch.equal(a, b) for a, b in zip(states(full), states(resumed)))
    assert_same_files(tmp_path / "split" / "step_0000004", tmp_path / "full" / "step_0000004")
