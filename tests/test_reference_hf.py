"""Our RWKV-4 against an independent implementation: transformers' RwkvForCausalLM.

Random configs with every parameter randomized at non-trivial scales, float32, 64 tokens:
same logits (max abs difference <= 1e-4); an HF directory written by ``save_pretrained`` loads
through ``load_model`` and gives HF's logits; our sequence and step modes agree; an OPT
directory loads through ``load_model`` as transformers' OPT.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import RwkvConfig, RwkvForCausalLM  # noqa: E402

from rllm.model import RWKV, RWKVConfig  # noqa: E402
from rllm.weights import FORMAT_HF, FORMAT_HF_OPT, ModelLoadError, load_model, rwkv_to_hf_name  # noqa: E402

T = 64
TOL = 1e-4


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random at a realistic, non-trivial scale; works on our names and HF's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.ndim == 2:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "time_mix" in n:
                p.copy_(torch.rand(p.shape, generator=g))
            elif "time_decay" in n or "time_first" in n:
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def hf_config(cfg: RWKVConfig, rescale_every=0) -> RwkvConfig:
    return RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                      attention_hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim, context_length=1024,
                      layer_norm_epsilon=cfg.layer_norm_eps, rescale_every=rescale_every, tie_word_embeddings=False)


def ids(vocab, seed=1, batch=2):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


CONFIGS = [
    RWKVConfig(vocab_size=97, n_layer=3, n_embd=32),
    RWKVConfig(vocab_size=61, n_layer=2, n_embd=48, ffn_dim=80),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c.n_layer}-D{c.n_embd}-F{c.ffn_dim}")
def test_logits_match_transformers(cfg):
    ours = randomize(RWKV(cfg), seed=cfg.n_layer).eval()
    hf = RwkvForCausalLM(hf_config(cfg)).eval()
    sd = {rwkv_to_hf_name(k): (v.view(1, 1, -1) if ".time_mix_" in k else v) for k, v in ours.state_dict().items()}
    result = hf.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    idx = ids(cfg.vocab_size)
    with torch.no_grad():
        a = ours(idx)
        b = hf(idx).logits
    diff = (a - b).abs().max().item()
    print(f"max |ours - transformers| = {diff:.2e} (logits up to {b.abs().max().item():.1f})")
    assert b.abs().max() > 1.0  # non-trivial
    assert diff <= TOL


@pytest.mark.parametrize("rescale_every", [0, 1])
def test_save_pretrained_directory_loads(tmp_path, rescale_every):
    cfg = CONFIGS[0]
    hf = randomize(RwkvForCausalLM(hf_config(cfg, rescale_every)), seed=7)
    # Saved before any eval-mode forward, as HF checkpoints are: weights un-rescaled.
    hf.save_pretrained(tmp_path / "hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    loaded = load_model(tmp_path / "hf")
    assert loaded.format == FORMAT_HF
    c = loaded.config
    assert (c.vocab_size, c.n_layer, c.n_embd, c.ffn_dim) == (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.ffn_dim)
    idx = ids(cfg.vocab_size, seed=2)
    with torch.no_grad():
        ref = hf.eval()(idx).logits
        got = loaded.model(idx)
    diff = (got - ref).abs().max().item()
    print(f"rescale_every={rescale_every}: max |load_model(save_pretrained dir) - transformers| = {diff:.2e}")
    # with rescale_every, HF halves the hidden state every few layers at inference; LayerNorm undoes it
    # up to its epsilon, hence the looser bound there
    assert diff <= (TOL if rescale_every == 0 else 1e-3)


def test_sharded_save_pretrained_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    cfg = CONFIGS[1]
    hf = randomize(RwkvForCausalLM(hf_config(cfg)), seed=3)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "hf" / "tokenizer.json"))
    loaded = load_model(tmp_path / "hf")
    assert loaded.tokenizer is not None and loaded.tokenizer.token_to_id("b") == 1
    idx = ids(cfg.vocab_size, seed=4)
    with torch.no_grad():
        assert (loaded.model(idx) - hf.eval()(idx).logits).abs().max() <= TOL
    # a missing shard is one clear error
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "hf" / shard).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(tmp_path / "hf")


def test_sequence_mode_equals_step_mode():
    cfg = CONFIGS[1]
    m = randomize(RWKV(cfg), seed=11).eval()
    idx = ids(cfg.vocab_size, seed=5)
    with torch.no_grad():
        seq = m(idx)
        state, outs = None, []
        for t in range(T):
            o, state = m.step(idx[:, t], state)
            outs.append(o)
    diff = (seq - torch.stack(outs, 1)).abs().max().item()
    print(f"max |sequence - step| = {diff:.2e}")
    assert diff <= TOL


def test_opt_directory_loads_through_transformers(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=128, word_embed_proj_dim=16)
    torch.manual_seed(0)
    opt = OPTForCausalLM(cfg).eval()
    opt.save_pretrained(tmp_path / "opt")
    loaded = load_model(tmp_path / "opt")
    assert loaded.format == FORMAT_HF_OPT and loaded.config.n_layer == 2 and loaded.name == "opt"
    idx = ids(64, seed=6)
    with torch.no_grad():
        assert torch.allclose(loaded.model(idx), opt(idx).logits, atol=1e-5)
    (tmp_path / "opt" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelLoadError, match="opt"):
        load_model(tmp_path / "opt")
