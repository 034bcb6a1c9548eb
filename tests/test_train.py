"""Training recipe: a smoke run on a tiny synthetic corpus writes every asset, and the loss decreases."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from rllm.model import RWKV, RWKVConfig
from rllm.tokenizer import load_tokenizer
from rllm.train import main

WORDS = ("gentle night morrow sorrow crown heaven tears honour sweet fortune blood brother "
         "kingdom father mother sword queen spirit shadow summer winter flower").split()
SMALL = "the my thy his and of to in".split()


def verse(rng, n_lines):
    lines = []
    for i in range(n_lines):
        a, b, c = rng.choice(WORDS), rng.choice(WORDS), rng.choice(WORDS)
        lines.append(f"{rng.choice(SMALL).capitalize()} {a} {rng.choice(SMALL)} {b}, {rng.choice(SMALL)} {c}{rng.choice('.,;!')}")
        if i % 6 == 5:
            lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    for split, docs, lines in (("train", 2, 500), ("calib", 1, 100), ("eval", 1, 160)):
        (root / split).mkdir()
        for d in range(docs):
            (root / split / f"work{d}.txt").write_text(verse(rng, lines))
    return root


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (and the test machine is shared)
    yield
    torch.set_num_threads(n)


def test_smoke_run_writes_all_assets(text_dir, tmp_path, one_thread):
    out = tmp_path / "out"
    report = main(["--out", str(out), "--text-dir", str(text_dir), "--device", "cpu", "--steps", "20",
                   "--n-layer", "1", "--n-embd", "32", "--ctx", "32", "--batch", "8", "--lr", "3e-3",
                   "--vocab-size", "300", "--eval-every", "10", "--eval-tokens", "512",
                   "--cloze-items", "20", "--mc-items", "10", "--no-progress", "--seed", "1"])
    for f in ("model.safetensors", "config.json", "tokenizer.json", "calib.txt", "eval.txt",
              "cloze.jsonl", "mc.jsonl", "train_report.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    cfg = RWKVConfig(**json.loads((out / "config.json").read_text()))
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim) == (1, 32, 300, 128)
    model = RWKV(cfg)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 300

    # the loss goes down, and the model ends well below the uniform distribution's perplexity
    hist = report["loss_history"]
    assert hist[-1] < hist[0] - 0.5
    assert report["eval"]["model_ppl"] < 300 and report["eval"]["ngram_ppl"] < report["eval"]["unigram_ppl"]
    assert report["steps"] == 20 and report["device"] == "cpu" and report["seed"] == 1
    assert set(report["hashes"]) >= {"train_docs_sha256", "eval_docs_sha256", "model.safetensors_sha256"}
    on_disk = json.loads((out / "train_report.json").read_text())
    assert on_disk["eval"]["model_ppl"] == report["eval"]["model_ppl"]

    # the saved weights are the ones evaluated: re-evaluate eval.txt with them
    ids = torch.tensor([0] + tok.encode((out / "eval.txt").read_text(), add_special_tokens=False).ids)
    from rllm.train import model_nll
    total, count = model_nll(model.eval(), ids, 32)
    assert abs(torch.tensor(total / count).exp().item() - report["eval"]["model_ppl"]) < 1e-2 * report["eval"]["model_ppl"]

    cloze = [json.loads(l) for l in (out / "cloze.jsonl").read_text().splitlines()]
    assert 0 < len(cloze) <= 20
    for item in cloze:
        assert item["text"][-1].isalpha() and " " in item["text"]
        assert 60 <= len(tok.encode(item["text"]).ids) <= 150
    mc = [json.loads(l) for l in (out / "mc.jsonl").read_text().splitlines()]
    assert 0 < len(mc) <= 10
    eval_text = (out / "eval.txt").read_text()
    for item in mc:
        assert len(item["choices"]) == 4 and 0 <= item["label"] < 4
        assert item["context"].endswith("\n")
        assert item["context"] + item["choices"][item["label"]] in eval_text
