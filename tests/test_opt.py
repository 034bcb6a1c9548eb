"""rllm.opt: OPT through transformers with the project's activation-site protocol.

Every test builds a tiny random ``OPTConfig`` model (2 layers, hidden 32) in milliseconds;
nothing is downloaded.
"""
import json

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from rllm.events import SparsityMeter, summarize, trace
from rllm.opt import EventOPT, OPTState, load_opt, opt_tokenizer

V, C, FFN, L, MAXPOS = 100, 32, 64, 2, 64


def tiny_hf(layer_norm_before: bool = True, proj_dim: int = C, seed: int = 0) -> OPTForCausalLM:
    """opt-125m's layout by default; ``layer_norm_before=False, proj_dim=16`` is opt-350m's."""
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, ffn_dim=FFN, num_attention_heads=4,
                    max_position_embeddings=MAXPOS, word_embed_proj_dim=proj_dim,
                    do_layer_norm_before=layer_norm_before, init_std=0.2)
    return OPTForCausalLM(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


LAYOUTS = {"ln_before": dict(layer_norm_before=True), "ln_after_350m": dict(layer_norm_before=False, proj_dim=16)}


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def layout(request):
    return LAYOUTS[request.param]


def tokens(B=2, T=24, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def median_thresholds(model: EventOPT, idx) -> dict[str, torch.Tensor]:
    """Per-site thresholds at the median |x| (per channel on fc1, scalar elsewhere): ~half the events go."""
    seen = {}
    hooks = [s.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, i[0].detach()))
             for n, s in model.sites.items()]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    out = {n: x.abs().flatten().quantile(0.5) for n, x in seen.items()}
    for n in out:
        if n.endswith("fc1"):
            out[n] = seen[n].abs().reshape(-1, seen[n].shape[-1]).quantile(0.5, dim=0)
    return out


def hand_hooked_reference(hf: OPTForCausalLM, thresholds: dict[str, torch.Tensor]) -> OPTForCausalLM:
    """A second copy of the HF model thresholded with plain pre-hooks on every matrix (q, k, v separately)."""
    ref = OPTForCausalLM(hf.config).eval()
    ref.load_state_dict(hf.state_dict())

    def cut(t):
        return lambda module, args: (args[0] * (args[0].abs() >= t),)

    dec = ref.model.decoder
    for i, layer in enumerate(dec.layers):
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.register_forward_pre_hook(cut(thresholds[f"layers.{i}.attn.qkv"]))
        layer.self_attn.out_proj.register_forward_pre_hook(cut(thresholds[f"layers.{i}.attn.out"]))
        layer.fc1.register_forward_pre_hook(cut(thresholds[f"layers.{i}.ffn.fc1"]))
        layer.fc2.register_forward_pre_hook(cut(thresholds[f"layers.{i}.ffn.fc2"]))
    if dec.project_in is not None:
        dec.project_in.register_forward_pre_hook(cut(thresholds["project_in"]))
        dec.project_out.register_forward_pre_hook(cut(thresholds["project_out"]))
    ref.lm_head.register_forward_pre_hook(cut(thresholds["head"]))
    return ref


# --- sites ---------------------------------------------------------------------------------

def test_sites_are_the_matrix_inputs_in_data_flow_order():
    m = EventOPT(tiny_hf(), name="tiny")
    assert list(m.sites) == [f"layers.{i}.{s}" for i in range(L) for s in ("attn.qkv", "attn.out", "ffn.fc1", "ffn.fc2")] + ["head"]
    dims = {n: (s.width, s.macs_per_event) for n, s in m.sites.items()}
    assert dims["layers.0.attn.qkv"] == (C, 3 * C)  # one site feeds q, k and v
    assert dims["layers.1.attn.out"] == (C, C)
    assert dims["layers.0.ffn.fc1"] == (C, FFN)
    assert dims["layers.0.ffn.fc2"] == (FFN, C)
    assert dims["head"] == (C, V)
    assert all(s.name == n for n, s in m.sites.items())
    assert (m.config.name, m.config.n_layer, m.config.n_embd, m.config.vocab_size) == ("tiny", L, C, V)


def test_embedding_projections_of_opt_350m_are_sites_too():
    m = EventOPT(tiny_hf(layer_norm_before=False, proj_dim=16))
    names = list(m.sites)
    assert names[0] == "project_in" and names[-2:] == ["project_out", "head"]
    assert (m.sites["project_in"].width, m.sites["project_in"].macs_per_event) == (16, C)
    assert (m.sites["project_out"].width, m.sites["head"].width) == (C, 16)


# --- numerics --------------------------------------------------------------------------------

def test_zero_thresholds_give_the_plain_hf_logits(layout):
    hf = tiny_hf(**layout)
    idx = tokens()
    with torch.no_grad():
        expected = hf(idx).logits
        got = EventOPT(hf)(idx)
    assert torch.equal(got, expected)


def test_thresholds_equal_a_hand_thresholded_reference(layout):
    hf = tiny_hf(**layout)
    m = EventOPT(hf)
    idx = tokens()
    with torch.no_grad():
        dense = m(idx)
    t = median_thresholds(m, idx)
    m.set_thresholds(t)  # the hooks live on hf itself: from here on hf is thresholded too
    with torch.no_grad():
        expected = hand_hooked_reference(hf, t)(idx).logits
        got = m(idx)
    assert not torch.allclose(got, dense, atol=1e-3)  # the thresholds do something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sparsity_meter_sees_every_site_and_natural_sparsity_after_relu(layout):
    m = EventOPT(tiny_hf(**layout))
    idx = tokens()
    with SparsityMeter(m) as meter, torch.no_grad():
        m(idx)
    tab = meter.table().set_index("site")
    assert (tab.total == tab.width * idx.numel()).all()
    fc2 = tab.loc[[f"layers.{i}.ffn.fc2" for i in range(L)]]
    assert (fc2.natural > 0.2).all() and (fc2.added.abs() < 1e-12).all()
    assert (tab.drop(fc2.index).natural < 0.05).all()

    m.set_thresholds(median_thresholds(m, idx))
    with SparsityMeter(m) as meter, torch.no_grad():
        m(idx)
    s = summarize(meter.table())
    assert 0.4 < s["sparsity_mean"] < 0.8


def test_trace_records_the_same_events_as_a_full_pass():
    m = EventOPT(tiny_hf())
    stream = tokens(B=1, T=40)[0]
    m.set_thresholds(median_thresholds(m, stream[None]))
    tr = trace(m, stream, window=16)  # windows carry the KV state
    with SparsityMeter(m) as meter, torch.no_grad():
        m(stream[None])
    tab = meter.table().set_index("site")
    for site in tr.sites:
        assert tr.mask(site).shape == (40, m.sites[site].width)
        assert tr.events_per_token(site).sum() == tab.loc[site, "events"]


# --- state -----------------------------------------------------------------------------------

def test_windows_with_state_equal_one_full_pass(layout):
    m = EventOPT(tiny_hf(**layout))
    m.set_thresholds({"layers.0.ffn.fc1": 0.1, "head": 0.05})
    idx = tokens(T=30)
    with torch.no_grad():
        full = m(idx)
        parts, state = [], None
        for s in range(0, 30, 8):
            logits, state = m(idx[:, s:s + 8], state=state, return_state=True)
            parts.append(logits)
    assert isinstance(state, OPTState) and state.n_tokens == 30
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_a_state_can_be_reused_and_is_never_modified():
    m = EventOPT(tiny_hf())
    idx = tokens(T=12)
    with torch.no_grad():
        _, ctx = m(idx[:, :8], return_state=True)
        a, _ = m(idx[:, 8:], state=ctx, return_state=True)
        m(tokens(T=3, seed=5), state=ctx)  # another continuation of the same context
        b = m(idx[:, 8:], state=ctx)
    assert ctx.n_tokens == 8
    assert torch.equal(a, b)


def test_step_equals_the_sequence_mode():
    m = EventOPT(tiny_hf())
    idx = tokens(T=6)
    with torch.no_grad():
        full = m(idx)
        state = None
        for t in range(6):
            logits, state = m.step(idx[:, t], state)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_running_past_the_learned_positions_is_an_error():
    m = EventOPT(tiny_hf())
    with torch.no_grad():
        _, state = m(tokens(T=MAXPOS - 2), return_state=True)
        with pytest.raises(ValueError, match=f"positions for {MAXPOS} tokens"):
            m(tokens(T=3), state=state)


# --- thresholds API --------------------------------------------------------------------------

def test_set_thresholds_errors_name_the_problem():
    m = EventOPT(tiny_hf())
    with pytest.raises(KeyError, match="layers.9.attn.qkv"):
        m.set_thresholds({"layers.9.attn.qkv": 0.1})
    with pytest.raises(ValueError, match=f"layers.0.ffn.fc2 must be a scalar or have {FFN} values"):
        m.set_thresholds({"layers.0.ffn.fc2": torch.ones(C)})
    m.set_thresholds({"layers.0.ffn.fc2": torch.full((FFN,), 0.5), "head": 0.25})
    got = m.get_thresholds()
    assert got["layers.0.ffn.fc2"].shape == (FFN,) and float(got["head"]) == 0.25
    assert float(got["layers.1.attn.out"]) == 0.0


# --- loading ---------------------------------------------------------------------------------

def write_gpt2_tokenizer(d):
    """vocab.json + merges.txt as the OPT repos ship them (special tokens <s> <pad> </s> <unk> = 0..3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 10, trainer)
    tok.model.save(str(d))


def test_save_pretrained_then_load_opt_round_trips(tmp_path):
    hf = tiny_hf(layer_norm_before=False, proj_dim=16)
    hf.save_pretrained(tmp_path / "tiny-opt")
    write_gpt2_tokenizer(tmp_path / "tiny-opt")
    model, tok = load_opt(tmp_path / "tiny-opt")
    assert isinstance(model, EventOPT) and not model.training
    assert model.config.name == "tiny-opt" and model.config.layer_norm_before is False
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits)
    assert tok.encode("The fox").ids[0] == 2  # </s> prepended, as transformers' OPT tokenizer does
    assert tok.encode("The fox", add_special_tokens=False).ids == tok.encode("The fox").ids[1:]
    assert tok.decode(tok.encode("The lazy dog.").ids) == "The lazy dog."


def test_built_tokenizer_matches_transformers_opt_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    write_gpt2_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "unk_token": "</s>", "pad_token": "<pad>"}))
    ours, theirs = opt_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["The quick fox", " leading space</s>and a tag", "ünïcödé 123!\n\nnew lines"]:
        assert ours.encode(text).ids == theirs(text).input_ids
        assert ours.encode(text, add_special_tokens=False).ids == theirs(text, add_special_tokens=False).input_ids


def test_a_tokenizer_json_is_used_as_is(tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    write_gpt2_tokenizer(tmp_path)
    opt_tokenizer(tmp_path).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.json").unlink()
    _, tok = load_opt(tmp_path)
    assert tok.encode("The fox").ids[0] == 2


@pytest.mark.parametrize("breakage, message", [
    ("nothing", "no such directory"),
    ("no_config", "no config.json"),
    ("bad_config", "unreadable config"),
    ("rwkv_config", "model_type is 'rwkv'"),
    ("no_weights", "no weights"),
    ("truncated_weights", "cannot load the OPT weights"),
    ("missing_tensor", "lacks 1 tensor"),
])
def test_load_opt_errors_say_what_is_wrong(tmp_path, breakage, message):
    d = tmp_path / "m"
    tiny_hf().save_pretrained(d)
    weights = d / "model.safetensors"
    if breakage == "nothing":
        d = tmp_path / "absent"
    elif breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "bad_config":
        (d / "config.json").write_text("{not json")
    elif breakage == "rwkv_config":
        (d / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "missing_tensor":
        from safetensors.torch import load_file, save_file

        sd = load_file(weights)
        del sd["model.decoder.layers.1.fc2.weight"]
        save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        load_opt(d)


def test_an_uncached_repo_id_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        load_opt("someone/not-an-opt-model")
