"""rllm.weights: BlinkDL .pth, HF-named and our own checkpoints load exactly; bad files give one clear error."""
import json

import pytest
import torch

from rllm.model import RWKV, RWKVConfig
from rllm.weights import (
    FORMAT_BLINKDL, FORMAT_HF, FORMAT_OURS, LoadedModel, ModelLoadError, hf_to_rwkv_name, infer_config, load_model,
    rwkv_to_hf_name, save_checkpoint,
)

VOCAB, LAYERS, EMBD, FFN = 53, 2, 24, 40  # ffn_dim deliberately not 4 * n_embd


def random_model(seed=0, vocab=VOCAB, n_layer=LAYERS, n_embd=EMBD, ffn_dim=FFN) -> RWKV:
    """Every parameter random with a non-trivial scale (as real weights are, unlike the init)."""
    torch.manual_seed(seed)
    m = RWKV(RWKVConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, ffn_dim=ffn_dim))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
            elif "time_mix" in n:
                p.uniform_(0, 1)
            elif "time_decay" in n or "time_first" in n:
                p.normal_(0, 1)
            elif n.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return m.eval()


def blinkdl_state_dict(m: RWKV, dtype=None) -> dict:
    """What a BlinkDL .pth holds: our names, time_mix as [1, 1, C]."""
    sd = {}
    for k, v in m.state_dict().items():
        v = v.clone()
        if ".time_mix_" in k:
            v = v.view(1, 1, -1)
        sd[k] = v.to(dtype) if dtype is not None else v
    return sd


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def logits(model, seed=3, T=40):
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)


def load_error(path, **kw) -> str:
    """The ModelLoadError message, checking it is one line and hides the library's traceback."""
    with pytest.raises(ModelLoadError) as ei:
        load_model(path, **kw)
    e = ei.value
    assert isinstance(e, ValueError)
    msg = str(e)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), "raw traceback leaked"
    return msg


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture
def pth(tmp_path, model):
    p = tmp_path / "RWKV-4-Test-20240101-0001.pth"
    torch.save(blinkdl_state_dict(model), p)
    return p


# --- formats that load ---------------------------------------------------------------------

def test_blinkdl_pth_loads_and_matches(pth, model):
    loaded = load_model(pth)
    assert isinstance(loaded, LoadedModel)
    assert loaded.format == FORMAT_BLINKDL and loaded.source == pth and loaded.tokenizer is None
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.ffn_dim) == (VOCAB, LAYERS, EMBD, FFN)
    assert loaded.name == "RWKV-4-Test-20240101-0001" and cfg.name == loaded.name
    assert not loaded.model.training
    assert loaded.model.blocks[0].att.time_mix_k.shape == (EMBD,)
    assert torch.equal(logits(loaded.model), logits(model))
    # every tensor is a real one (nothing left on the meta device), thresholds work
    assert all(not t.is_meta for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    loaded.model.set_thresholds({"blocks.0.ffn.value": 0.01})
    logits(loaded.model)


def test_pth_picks_up_tokenizer_beside_it(pth):
    make_tokenizer().save(str(pth.parent / "20B_tokenizer.json"))
    loaded = load_model(pth)
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("the cat").ids == [2, 3]


def test_bf16_pth_and_dtype(tmp_path, model):
    p = tmp_path / "bf16.pth"
    torch.save(blinkdl_state_dict(model, torch.bfloat16), p)
    a = load_model(p)  # default float32
    assert a.model.emb.weight.dtype == torch.float32
    b = load_model(p, dtype="bfloat16")
    assert b.model.head.weight.dtype == torch.bfloat16
    ref = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert torch.equal(a.model.state_dict()["blocks.1.att.key.weight"], ref["blocks.1.att.key.weight"])


def test_own_format_round_trips(tmp_path, model):
    tok = make_tokenizer()
    d = save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((d / "config.json").read_text())["ffn_dim"] == FFN
    loaded = load_model(d)
    assert loaded.format == FORMAT_OURS and loaded.config == model.config
    assert torch.equal(logits(loaded.model), logits(model))
    assert loaded.tokenizer.encode("a mat").ids == tok.encode("a mat").ids
    # a path to the config.json itself works too, and save_checkpoint accepts a tokenizer path
    d2 = save_checkpoint(loaded.model, tmp_path / "ckpt2", tokenizer=d / "tokenizer.json")
    assert torch.equal(logits(load_model(d2 / "config.json").model), logits(model))


def test_hf_named_safetensors_file(tmp_path, model):
    from safetensors.torch import save_file

    sd = {rwkv_to_hf_name(k): v.contiguous() for k, v in blinkdl_state_dict(model).items()}
    assert "rwkv.blocks.0.attention.time_mix_key" in sd and "rwkv.blocks.0.pre_ln.weight" in sd
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p))
    loaded = load_model(p)
    assert loaded.format == FORMAT_HF
    assert torch.equal(logits(loaded.model), logits(model))


def test_name_mapping_is_a_bijection(model):
    names = list(model.state_dict())
    assert [hf_to_rwkv_name(rwkv_to_hf_name(n)) for n in names] == names
    assert hf_to_rwkv_name("rwkv.blocks.3.feed_forward.time_mix_receptance") == "blocks.3.ffn.time_mix_r"
    assert hf_to_rwkv_name("rwkv.embeddings.weight") == "emb.weight"


def test_wrapped_state_dict_and_directory_with_one_pth(tmp_path, model):
    d = tmp_path / "dir"
    d.mkdir()
    torch.save({"state_dict": blinkdl_state_dict(model)}, d / "w.pth")
    loaded = load_model(d)
    assert torch.equal(logits(loaded.model), logits(model))


# --- files that do not load: one clear error each -------------------------------------------

def test_truncated_pth(tmp_path, pth):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    msg = load_error(bad)
    assert "truncated" in msg and "download it again" in msg


def test_truncated_safetensors(tmp_path, model):
    d = save_checkpoint(model, tmp_path / "ckpt")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    msg = load_error(d / "model.safetensors")
    assert "truncated" in msg or "corrupted" in msg
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(d)


def test_wrong_shaped_tensor(tmp_path, model):
    sd = blinkdl_state_dict(model)
    sd["blocks.1.att.key.weight"] = torch.randn(EMBD, EMBD - 1)
    p = tmp_path / "wrong_shape.pth"
    torch.save(sd, p)
    msg = load_error(p)
    assert "blocks.1.att.key.weight" in msg and f"[{EMBD}, {EMBD - 1}]" in msg and f"[{EMBD}, {EMBD}]" in msg


def test_missing_tensor(tmp_path, model):
    sd = blinkdl_state_dict(model)
    del sd["blocks.1.ffn.value.weight"]
    p = tmp_path / "missing.pth"
    torch.save(sd, p)
    msg = load_error(p)
    assert "missing tensor" in msg and "blocks.1.ffn.value.weight" in msg


def test_unexpected_tensor(tmp_path, model):
    sd = blinkdl_state_dict(model)
    sd["blocks.0.att.gate.weight"] = torch.randn(EMBD, EMBD)
    p = tmp_path / "extra.pth"
    torch.save(sd, p)
    msg = load_error(p)
    assert "unexpected tensor" in msg and "blocks.0.att.gate.weight" in msg


def test_newer_rwkv_is_named(tmp_path, model):
    sd = blinkdl_state_dict(model)
    sd["blocks.0.att.time_faaaa"] = torch.randn(2, 12)
    p = tmp_path / "v5.pth"
    torch.save(sd, p)
    assert "only RWKV-4" in load_error(p)


def test_nan_tensor(tmp_path, model):
    sd = blinkdl_state_dict(model)
    sd["blocks.0.ffn.key.weight"][3, 4] = float("nan")
    p = tmp_path / "nan.pth"
    torch.save(sd, p)
    assert "NaN" in load_error(p)


def test_random_bytes(tmp_path):
    p = tmp_path / "random.pth"
    p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    assert "not a checkpoint" in load_error(p)


def test_text_file(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("these are not weights\n" * 10)
    msg = load_error(p)
    assert "not a checkpoint" in msg and "text file" in msg


def test_empty_and_lfs_pointer(tmp_path):
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    assert "empty" in load_error(p)
    p = tmp_path / "pointer.pth"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 677440778\n")
    assert "Git LFS pointer" in load_error(p)


def test_pickled_objects_are_refused(tmp_path, model):
    p = tmp_path / "whole_model.pth"
    torch.save(model, p)  # a pickled nn.Module, not a state dict: weights_only refuses it
    assert "weights_only" in load_error(p)
    p = tmp_path / "list.pth"
    torch.save([1, 2, 3], p)
    assert "not a state dict" in load_error(p)


def test_safetensors_without_rwkv_tensors(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(p))
    assert "no emb.weight" in load_error(p)


def test_bad_directories(tmp_path, model):
    d = save_checkpoint(model, tmp_path / "ckpt")
    (d / "config.json").write_text("{not json")
    assert "unreadable JSON" in load_error(d / "config.json")

    d = save_checkpoint(model, tmp_path / "mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"emb\.weight has shape \[53, 24\], expected \[53, 16\]"):
        load_model(d)

    d = tmp_path / "hf_no_weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "rwkv", "hidden_size": 8, "num_hidden_layers": 1,
                                               "vocab_size": 10}))
    assert "no weights" in load_error(d)

    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "'bert'" in load_error(d)

    d = tmp_path / "emptydir"
    d.mkdir()
    assert "no config.json and no weights file" in load_error(d)


def test_missing_path_and_bad_tokenizer(tmp_path, pth):
    msg = load_error(tmp_path / "nope" / "model.pth")
    assert "no such file" in msg
    (pth.parent / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(pth)


def test_infer_config_from_tensors(model):
    cfg = infer_config(blinkdl_state_dict(model))
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim) == (LAYERS, EMBD, VOCAB, FFN)


def test_hf_directory_with_pytorch_model_bin_and_tied_head(tmp_path, model):
    d = tmp_path / "hf_bin"
    d.mkdir()
    sd = {rwkv_to_hf_name(k): v for k, v in blinkdl_state_dict(model).items() if k != "head.weight"}
    torch.save(sd, d / "pytorch_model.bin")
    hf_cfg = {"model_type": "rwkv", "vocab_size": VOCAB, "hidden_size": EMBD, "num_hidden_layers": LAYERS,
              "attention_hidden_size": EMBD, "intermediate_size": FFN, "tie_word_embeddings": True}
    (d / "config.json").write_text(json.dumps(hf_cfg))
    loaded = load_model(d)
    assert loaded.format == FORMAT_HF
    assert torch.equal(loaded.model.head.weight, model.emb.weight)
    # without tying, the missing head is an error naming it
    (d / "config.json").write_text(json.dumps({**hf_cfg, "tie_word_embeddings": False}))
    assert "head.weight" in load_error(d)


def test_meta_device_build_path(monkeypatch, pth, model):
    """Large models are built on the meta device and take the checkpoint's tensors: same result."""
    import rllm.weights as w

    monkeypatch.setattr(w, "META_BUILD_ABOVE", 0)
    loaded = load_model(pth)
    assert all(not t.is_meta for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    assert torch.equal(logits(loaded.model), logits(model))
    loaded.model.set_thresholds({"blocks.1.att.output": 0.05})
    assert not torch.equal(logits(loaded.model), logits(model))
    b = load_model(pth, dtype=torch.bfloat16)
    assert b.model.blocks[0].att.key.weight.dtype == torch.bfloat16
