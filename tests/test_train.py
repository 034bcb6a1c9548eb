"""Training recipe: a smoke run on a tiny synthetic corpus writes every asset, and the loss decreases."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from rllm.model import RWKV, RWKVConfig
from rllm.tokenizer import load_tokenizer
from rllm.training.recipe import main

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
    assert report["eval"]["eval_ppl"] < 300 and report["ngram"]["eval_ppl"] < report["ngram"]["unigram_eval_ppl"]
    assert report["steps"] == 20 and report["device"] == "cpu" and report["seed"] == 1
    assert set(report["hashes"]) >= {"train_docs_sha256", "eval_docs_sha256", "model.safetensors_sha256"}
    on_disk = json.loads((out / "train_report.json").read_text())
    assert on_disk["eval"]["eval_ppl"] == report["eval"]["eval_ppl"]

    # the saved weights are the ones evaluated: re-evaluate eval.txt with them
    ids = torch.tensor([0] + tok.encode((out / "eval.txt").read_text(), add_special_tokens=False).ids)
    from rllm.training.recipe import model_nll
    total, count = model_nll(model.eval(), ids, 32)
    assert abs(torch.tensor(total / count).exp().item() - report["eval"]["eval_ppl"]) < 1e-2 * report["eval"]["eval_ppl"]

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


TINY = ["--device", "cpu", "--n-layer", "1", "--n-embd", "32", "--ctx", "32", "--batch", "8", "--vocab-size", "300",
        "--eval-tokens", "512", "--cloze-items", "20", "--mc-items", "10", "--no-progress"]


def test_the_shipped_rwkv_tiny_command_still_gives_its_recorded_settings():
    from pathlib import Path

    from rllm.training.recipe import parse_args
    asset = Path(__file__).resolve().parents[1] / "rllm" / "assets" / "rwkv_tiny"
    recorded = json.loads((asset / "train_report.json").read_text())["args"]
    command = next(line.strip() for line in (asset / "README.md").read_text().splitlines()
                   if line.strip().startswith("python -m rllm.training"))
    args = vars(parse_args(command.split()[3:]))
    assert args["corpus"] == "shakespeare" and args["heldout"] == "lines" and args["patience"] is None
    assert {k: args[k] for k in recorded if k not in ("out", "no_progress")} == \
        {k: v for k, v in recorded.items() if k not in ("out", "no_progress")}


def test_a_preset_sets_the_defaults_and_flags_override_it():
    from rllm.training.recipe import PRESETS, parse_args, reproduce_command
    a = parse_args(["--out", "x", "--preset", "rwkv_pd12"])
    assert (a.n_layer, a.n_embd, a.vocab_size, a.corpus, a.dtype) == (12, 256, 12288, "pd-english", "bfloat16")
    assert 8192 <= a.vocab_size <= 16384 and a.n_layer >= 12 and a.n_embd >= 256
    b = parse_args(["--out", "x", "--preset", "rwkv_pd12", "--steps", "7", "--n-embd", "320"])
    assert (b.steps, b.n_embd, b.n_layer) == (7, 320, 12)
    again = parse_args(reproduce_command(vars(b)).split()[3:])
    assert vars(again) == {**vars(b), "out": "DIR"}
    assert set(PRESETS["rwkv_pd12"]) <= set(vars(a))


def test_patience_stops_a_run_that_no_longer_improves(text_dir, tmp_path, one_thread):
    """With a learning rate of 0 the calibration loss never improves after the first check."""
    report = main(["--out", str(tmp_path / "o"), "--text-dir", str(text_dir), *TINY, "--steps", "50", "--lr", "0",
                   "--min-lr", "0", "--eval-every", "2", "--patience", "2"])
    assert report["stop_reason"] == "patience" and report["steps"] == 6
    assert [c["step"] for c in report["checks"]] == [2, 4, 6] and report["best_step"] == 2
    assert all("train_sample_loss" in c for c in report["checks"])
    readme = (tmp_path / "o" / "README.md").read_text()
    assert "had not improved by 0.0 for 2 checks" in readme and "| 6 |" in readme


def test_data_only_writes_the_held_out_sets_and_baseline_with_a_dev_split(text_dir, tmp_path):
    import shutil
    root = tmp_path / "texts"
    shutil.copytree(text_dir, root)
    (root / "dev").mkdir()
    (root / "dev" / "work.txt").write_text((root / "calib" / "work0.txt").read_text())
    out = tmp_path / "o"
    report = main(["--out", str(out), "--text-dir", str(root), *TINY, "--data-only", "--heldout", "passages",
                   "--heldout-work-chars", "3000", "--ngram-orders", "2,3"])
    assert not (out / "model.safetensors").exists() and "config" not in report
    for f in ("tokenizer.json", "calib.txt", "eval.txt", "dev.txt", "cloze.jsonl", "mc.jsonl", "dev_cloze.jsonl",
              "dev_mc.jsonl", "train_report.json", "README.md"):
        assert (out / f).is_file(), f
    assert len((out / "eval.txt").read_text()) <= 3001
    assert report["tokens"]["dev"] > 0 and set(report["ngram"]["all_orders"]) == {"2", "3"}
    assert report["sizes"]["train"]["train"]["works"] == 2
    assert "No model was trained" in (out / "README.md").read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--text-dir", str(tmp_path / "missing"), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no .txt files in") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--preset", "nope"])
    assert e.value.code == 2


def test_benchmark_times_steps_of_the_configuration(tmp_path, one_thread):
    from rllm.training.recipe import training_flops_per_token
    res = main(["--out", str(tmp_path / "o"), *TINY, "--benchmark-steps", "2"])
    assert res["s_per_step"] > 0 and res["params"] > 0
    for cfg in (RWKVConfig(vocab_size=300, n_layer=1, n_embd=32), RWKVConfig(vocab_size=12288, n_layer=12, n_embd=256)):
        # one multiply-accumulate per weight of every matrix but the embedding (a lookup), x 6 for training
        macs = sum(p.numel() for n, p in RWKV(cfg).named_parameters() if p.ndim == 2 and not n.startswith("emb."))
        assert training_flops_per_token(cfg) == 6 * macs
    assert res["matmul_flops_per_step"] == training_flops_per_token(RWKVConfig(vocab_size=300, n_layer=1, n_embd=32)) * 8 * 32


def test_two_stages_give_the_same_files_as_one(text_dir, tmp_path, one_thread):
    """--data-only then --from-data: the GPU stage reads the prepared files (checked by sha256)."""
    common = ["--text-dir", str(text_dir), *TINY, "--steps", "4", "--eval-every", "2", "--ngram-orders", "2"]
    prep = main(["--out", str(tmp_path / "prep"), *common, "--data-only"])
    assert (tmp_path / "prep" / "train_tokens.npy").is_file() and "train_tokens.npy_sha256" in prep["hashes"]
    one = main(["--out", str(tmp_path / "one"), *common])
    two = main(["--out", str(tmp_path / "two"), *common, "--from-data", str(tmp_path / "prep")])
    for f in ("tokenizer.json", "eval.txt", "cloze.jsonl", "mc.jsonl"):
        assert (tmp_path / "two" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    assert two["tokens"] == one["tokens"] and two["ngram"] == one["ngram"]
    assert two["loss_history"] == one["loss_history"]  # same data, same seed: the same training on CPU
    command = next(l for l in (tmp_path / "two" / "README.md").read_text().splitlines() if "python -m rllm.training" in l)
    assert "--from-data" not in command and "--data-only" not in command  # the one-command equivalent
    assert not (tmp_path / "two" / "train_tokens.npy").exists()


def test_from_data_refuses_other_settings_and_altered_files(text_dir, tmp_path, capsys):
    common = ["--text-dir", str(text_dir), *TINY, "--steps", "2", "--ngram-orders", "2"]
    main(["--out", str(tmp_path / "prep"), *common, "--data-only"])
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), *common, "--vocab-size", "320", "--from-data", str(tmp_path / "prep")])
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err
    with open(tmp_path / "prep" / "eval.txt", "a") as f:
        f.write("one more line\n")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), *common, "--from-data", str(tmp_path / "prep")])
    assert e.value.code == 2 and "differs from the sha256" in capsys.readouterr().err


def test_the_ngram_baseline_scores_the_task_files(tmp_path):
    """On a text the n-gram has memorized, a cloze item with the memorized last word is right and one
    with another word wrong; the memorized continuation wins the multiple choice."""
    from rllm.training import ngram
    from rllm.training.heldout import write_jsonl
    from rllm.tokenizer import encode_documents, train_tokenizer
    from rllm.training.recipe import ngram_task_scores
    text = "the quick brown fox jumps over the lazy dog. " * 50
    tok = train_tokenizer([text], 300)
    lm = ngram.train_ngram(encode_documents(tok, [text]), tok.get_vocab_size(), 4)
    write_jsonl(tmp_path / "cloze.jsonl", [{"text": "the quick brown fox jumps over the lazy dog"},
                                           {"text": "the quick brown fox jumps over the lazy fox"}])
    write_jsonl(tmp_path / "mc.jsonl", [{"context": "the quick brown fox", "choices": ["over the dog", "jumps over the"], "label": 1},
                                        {"context": "the quick brown fox", "choices": ["over the dog", "jumps over the"], "label": 0}])
    assert ngram_task_scores(lm, tok, tmp_path) == {"cloze_acc": 0.5, "mc_acc": 0.5, "mc_acc_mutual_info": 0.5}
    assert ngram_task_scores(lm, tok, tmp_path, with_mi=False) == {"cloze_acc": 0.5, "mc_acc": 0.5}
