"""rllm.zoo: names, did-you-mean, and the resolution order for weights; never touches the network."""
import json
import shutil

import pytest
import torch

from rllm import zoo
from rllm.model import RWKV, RWKVConfig
from rllm.weights import FORMAT_BLINKDL, FORMAT_HF, FORMAT_OURS, ModelLoadError, load_model, rwkv_to_hf_name, save_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_model(seed=0, vocab=41, n_layer=2, n_embd=16) -> RWKV:
    torch.manual_seed(seed)
    m = RWKV(RWKVConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
            elif "time_mix" in n:
                p.uniform_(0, 1)
            else:
                p.normal_(0, 1) if "time_" in n else p.copy_(1 + 0.2 * torch.randn_like(p))
    return m.eval()


def blinkdl_sd(m):
    return {k: (v.clone().view(1, 1, -1) if ".time_mix_" in k else v.clone()) for k, v in m.state_dict().items()}


def tokenizer_json(path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(path))
    return path


def same(a, b):
    idx = torch.randint(0, a.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(idx), b(idx))


MINI = zoo.ZooEntry(name="rwkv_mini", kind="rwkv", description="a test model", n_layer=2, n_embd=16, vocab_size=41,
                    ffn_dim=64, context_length=256, hf_repo="test-org/rwkv-mini-hf",
                    blinkdl_repo="test-org/rwkv-mini-blinkdl", blinkdl_file="RWKV-Mini-0001.pth")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Empty HF cache under tmp_path, offline, no $EVENT_RWKV_MODELS, and any hub network call fails the test."""
    import huggingface_hub

    for var in ("EVENT_RWKV_MODELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("the tests must not touch the network")

    for fn in ("hf_hub_download", "list_repo_files", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, fn, no_network)
    monkeypatch.setattr(zoo, "_unreachable", lambda *a, **k: None)  # no TCP probe of huggingface.co either
    monkeypatch.setitem(zoo.ZOO, MINI.name, MINI)
    return tmp_path


def fake_cache_repo(tmp_path, repo, files: dict) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    root = tmp_path / "hf_home" / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(snap / name)


def hf_files(m):
    from safetensors.torch import save_file

    cfg = m.config
    return {
        "config.json": lambda p: p.write_text(json.dumps({
            "model_type": "rwkv", "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "attention_hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim, "layer_norm_epsilon": 1e-5,
            "context_length": 256, "rescale_every": 6, "tie_word_embeddings": False})),
        "model.safetensors": lambda p: save_file(
            {rwkv_to_hf_name(k): v.contiguous() for k, v in blinkdl_sd(m).items()}, str(p)),
        "tokenizer.json": tokenizer_json,
    }


# --- names ----------------------------------------------------------------------------------

def test_known_models_and_published_configs():
    for n in ("rwkv_tiny", "rwkv_169m", "rwkv_430m", "rwkv_1b5", "opt_125m", "opt_350m", "opt_1.3b"):
        assert n in zoo.names()
    c = zoo.get_entry("rwkv_430m").rwkv_config()
    assert (c.n_layer, c.n_embd, c.vocab_size, c.ffn_dim, c.context_length) == (24, 1024, 50277, 4096, 1024)
    e = zoo.get_entry("rwkv_1b5")
    assert (e.n_layer, e.n_embd, e.hf_repo, e.blinkdl_repo, e.blinkdl_file) == (
        24, 2048, "RWKV/rwkv-4-1b5-pile", "BlinkDL/rwkv-4-pile-1b5", "RWKV-4-Pile-1B5-20220903-8040.pth")
    assert zoo.get_entry("rwkv_169m").blinkdl_file == "RWKV-4-Pile-169M-20220807-8023.pth"
    assert zoo.get_entry("opt_125m").kind == "opt" and zoo.get_entry("opt_125m").hf_repo == "facebook/opt-125m"
    # aliases: HF repo ids, case and dashes
    assert zoo.lookup("RWKV/rwkv-4-169m-pile").name == "rwkv_169m"
    assert zoo.lookup("BlinkDL/rwkv-4-pile-430m").name == "rwkv_430m"
    assert zoo.lookup("RWKV-169M").name == "rwkv_169m"


def test_unknown_name_did_you_mean():
    with pytest.raises(ModelLoadError) as ei:
        load_model("rwkv_43m")
    msg = str(ei.value)
    assert "unknown model 'rwkv_43m'" in msg and "did you mean 'rwkv_430m'" in msg
    assert "rwkv_tiny" in msg and "opt_125m" in msg
    with pytest.raises(ModelLoadError, match="known models are"):
        load_model("completely-different")


# --- not found: the error lists what was tried ----------------------------------------------

def test_offline_without_weights_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError) as ei:
        load_model("rwkv_430m")
    msg = str(ei.value)
    cache = str(tmp_path / "hf_home" / "hub")
    for part in ("no weights found for rwkv_430m", "EVENT_RWKV_MODELS", cache, "RWKV/rwkv-4-430m-pile not cached",
                 "BlinkDL/rwkv-4-pile-430m/RWKV-4-Pile-430M-20220808-8066.pth not cached",
                 "skipped (HF_HUB_OFFLINE is set)", "hf download RWKV/rwkv-4-430m-pile",
                 "huggingface-cli download RWKV/rwkv-4-430m-pile",
                 "hf download BlinkDL/rwkv-4-pile-430m RWKV-4-Pile-430M-20220808-8066.pth", "--weights PATH"):
        assert part in msg, part
    with pytest.raises(ModelLoadError, match="facebook/opt-125m not cached"):
        load_model("opt_125m")


def test_shipped_model_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "ASSETS", tmp_path / "no_assets")
    with pytest.raises(ModelLoadError, match="restore the shipped files rllm/assets/rwkv_tiny"):
        load_model("rwkv_tiny")


# --- found: each place in the resolution order ----------------------------------------------

def test_weights_argument(tmp_path):
    m = random_model()
    torch.save(blinkdl_sd(m), tmp_path / "w.pth")
    loaded = load_model("rwkv_mini", weights=tmp_path / "w.pth")
    assert loaded.name == "rwkv_mini" and loaded.config.name == "rwkv_mini" and loaded.config.context_length == 256
    assert same(loaded.model, m)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model("rwkv_mini", weights=tmp_path / "missing.pth")


def test_local_models_dir_convention(monkeypatch, tmp_path):
    m = random_model(seed=1)
    models = tmp_path / "models"
    save_checkpoint(m, models / "rwkv_mini", tokenizer=tokenizer_json(tmp_path / "t.json"))
    monkeypatch.setenv("EVENT_RWKV_MODELS", str(models))
    loaded = load_model("rwkv_mini")
    assert loaded.format == FORMAT_OURS and loaded.source == models / "rwkv_mini"
    assert same(loaded.model, m) and loaded.tokenizer.token_to_id("world") == 1
    # a .pth named after the model works too
    shutil.rmtree(models / "rwkv_mini")
    torch.save(blinkdl_sd(m), models / "rwkv_mini.pth")
    assert load_model("rwkv_mini").format == FORMAT_BLINKDL
    # and it wins over the shipped rwkv_tiny
    save_checkpoint(m, models / "rwkv_tiny")
    assert load_model("rwkv_tiny").source == models / "rwkv_tiny"


def test_shipped_rwkv_tiny(monkeypatch, tmp_path):
    m = random_model(seed=2)
    save_checkpoint(m, tmp_path / "assets" / "rwkv_tiny", tokenizer=tokenizer_json(tmp_path / "t.json"))
    monkeypatch.setattr(zoo, "ASSETS", tmp_path / "assets")
    loaded = load_model("rwkv_tiny")
    assert loaded.name == "rwkv_tiny" and same(loaded.model, m) and loaded.tokenizer is not None


def test_published_shape_is_checked(monkeypatch, tmp_path):
    save_checkpoint(random_model(), tmp_path / "models" / "rwkv_169m")
    monkeypatch.setenv("EVENT_RWKV_MODELS", str(tmp_path / "models"))
    with pytest.raises(ModelLoadError, match=r"L2-D16 .* but rwkv_169m is L12-D768"):
        load_model("rwkv_169m")


def test_hf_cache_hf_format(tmp_path):
    m = random_model(seed=3)
    fake_cache_repo(tmp_path, MINI.hf_repo, hf_files(m))
    loaded = load_model("rwkv_mini")
    assert loaded.format == FORMAT_HF and COMMIT in str(loaded.source)
    assert same(loaded.model, m) and loaded.tokenizer.token_to_id("hello") == 0


def test_hf_cache_blinkdl_pth_with_tokenizer_from_hf_repo(tmp_path):
    m = random_model(seed=4)
    fake_cache_repo(tmp_path, MINI.blinkdl_repo, {MINI.blinkdl_file: lambda p: torch.save(blinkdl_sd(m), p)})
    fake_cache_repo(tmp_path, MINI.hf_repo, {"tokenizer.json": tokenizer_json})  # tokenizer only: no weights
    loaded = load_model("rwkv_mini")
    assert loaded.format == FORMAT_BLINKDL and loaded.source.name == MINI.blinkdl_file
    assert same(loaded.model, m) and loaded.tokenizer is not None


def test_hf_cache_incomplete_download_is_reported(tmp_path):
    files = hf_files(random_model())
    del files["model.safetensors"]
    fake_cache_repo(tmp_path, MINI.hf_repo, files)
    with pytest.raises(ModelLoadError, match="cached without \\(all of\\) its weights"):
        load_model("rwkv_mini")


def test_download_when_online(monkeypatch, tmp_path):
    """The download path with huggingface_hub mocked: safetensors preferred, files land in the cache."""
    import huggingface_hub

    m = random_model(seed=5)
    src = tmp_path / "remote"
    src.mkdir()
    for name, write in hf_files(m).items():
        write(src / name)
    calls = []

    def list_repo_files(repo, **kw):
        assert repo == MINI.hf_repo
        return ["config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin", "README.md"]

    def hf_hub_download(repo, filename, cache_dir=None, **kw):
        calls.append(filename)
        dest = __import__("pathlib").Path(cache_dir) / "dl" / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / filename, dest)
        return str(dest)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    loaded = load_model("rwkv_mini")
    assert same(loaded.model, m) and loaded.tokenizer is not None
    assert sorted(calls) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert str(tmp_path / "hf_home" / "hub") in str(loaded.source)


def test_download_failure_is_reported(monkeypatch):
    import huggingface_hub

    def offline_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_network)
    with pytest.raises(ModelLoadError) as ei:
        load_model("rwkv_mini")
    msg = str(ei.value)
    assert "download of test-org/rwkv-mini-hf: failed (OSError: network is unreachable)" in msg
    assert "download of test-org/rwkv-mini-blinkdl/RWKV-Mini-0001.pth: failed" in msg
    # download=False is honoured even when online
    with pytest.raises(ModelLoadError, match=r"skipped \(download=False\)"):
        load_model("rwkv_mini", download=False)


def test_unreachable_hub_skips_the_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(zoo, "_unreachable", lambda *a, **k: "huggingface.co:443 unreachable (test)")
    with pytest.raises(ModelLoadError, match=r"skipped, huggingface.co:443 unreachable \(test\)"):
        load_model("rwkv_mini")
