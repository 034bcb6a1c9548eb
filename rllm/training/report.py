"""``README.md`` of a trained asset directory, written from its ``train_report.json`` contents.

Every figure in it comes from the report of the run that wrote the directory; the text names
each source of the training data and its license.
"""
from __future__ import annotations

from pathlib import Path

WORDNET_NOTICE = """WordNet 3.0 license: "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
WARRANTIES, EXPRESS OR IMPLIED. [...] The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software and/or database." (the full text:
`/usr/share/doc/wordnet-base/copyright` of the Debian package)."""


def _model_section(r: dict, command: str) -> str:
    if "config" not in r:
        return ("No model was trained (`--data-only`): this directory holds the corpus's held-out texts, the tokenizer,\n"
                f"the task sets and the n-gram baseline of the recipe below. Command:\n\n    {command}\n")
    c, a, last = r["config"], r["args"], r["checks"][-1]
    best = next(ch for ch in r["checks"] if ch["step"] == r["best_step"])
    stop = {"steps": "it reached --steps", "patience": f"the calibration loss had not improved by {a['min_delta']} "
            f"for {a['patience']} checks", "max-minutes": f"it reached --max-minutes {a['max_minutes']}"}[r["stop_reason"]]
    rows = "\n".join(f"| {ch['step']} | {ch['train_loss']:.3f} | {ch.get('train_sample_loss', float('nan')):.3f} | "
                     f"{ch['calib_loss']:.3f} |" for ch in r["checks"])
    return f"""An RWKV-4 language model ({c['n_layer']} layers, width {c['n_embd']}, {r['params'] / 1e6:.2f} M parameters,
vocabulary {r['vocab_size']}, weights stored as {r['model_dtype']}) trained by `rllm/training/recipe.py`:

    {command}

on {r['device']} (seed {r['seed']}, {r['steps']} steps of {a['batch']} x {a['ctx']} tokens, {r['train_time_s']:.0f} s of
training, {r['tokens_per_s']:,} tokens/s). Training stopped because {stop}. The checkpoint kept is the one with the
lowest calibration loss: step {r['best_step']}, where the calibration loss was {best['calib_loss']:.3f} and the loss on a
fixed training sample of the same size {best.get('train_sample_loss', float('nan')):.3f}; at the last check (step
{last['step']}) the calibration loss was {last['calib_loss']:.3f}.{_stages(r)}

Training curve (mean NLL per token, nats; "batches" is the mean over the last 50 training batches):

| step | train (batches) | train (fixed sample) | calibration |
|---|---|---|---|
{rows}
"""


def _stages(r: dict) -> str:
    if not r.get("prepared_in"):
        return ""
    return ("\nThe run had two stages: the data, tokenizer, task sets and n-gram baseline were prepared by the same command\n"
            f"with `--data-only` ({r.get('prepare_wall_time_s')} s), and the training read them with `--from-data`.")


def _ppl_section(r: dict) -> str:
    n, e = r["ngram"], r.get("eval", {})
    rows = []
    if e:
        rows.append(f"| this RWKV-4 | {e['eval_ppl']:.2f} | {e['calib_ppl']:.2f} | {e.get('dev_ppl', float('nan')):.2f} |")
        rows.append(f"| this RWKV-4, state carried over the whole text | {e['eval_ppl_stateful']:.2f} | | |")
    rows.append(f"| interpolated Kneser-Ney {n['order']}-gram, training works (order chosen on calibration) | "
                f"{n['eval_ppl']:.2f} | {n['calib_ppl']:.2f} | {n.get('dev_ppl', float('nan')):.2f} |")
    others = ", ".join(f"{o}-gram {v['eval_ppl']:.2f}" for o, v in n["all_orders"].items())
    rows.append(f"| unigram | {n['unigram_eval_ppl']:.2f} | | |")
    tasks = n.get("tasks", {})
    scores = ", ".join(f"{k.removesuffix('_acc')} {v:.3f}" for k, v in tasks.items())
    task_line = f"\nThe {n['order']}-gram's accuracy on the task sets (chance: 0 for cloze, 0.25 for mc): {scores}.\n" if tasks else ""
    return ("Perplexity per token (`<|endoftext|>` + text, tokens 1..n-1 scored; the model reads windows of "
            f"{r['args']['ctx']} tokens from a fresh state):\n\n| model | eval.txt | calib.txt | dev.txt |\n|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\nEvery n-gram order tried, on eval.txt: {others}.\n" + task_line)


def _data_section(r: dict) -> str:
    corpus = r["corpus"]
    lines = [f"Data: {corpus['source']}. Downloads (each checked against its sha256 before use):", ""]
    lines += ["| file | registry | sha256 | license |", "|---|---|---|---|"]
    lines += [f"| `{d['file']}` | {d['registry']} | `{d['sha256'][:16]}...` | {d['license']} |" for d in corpus["downloads"]]
    if corpus.get("dropped"):
        lines += ["", "Dropped as duplicates: " + "; ".join(f"`{d['name']}` ({d['reason']})" for d in corpus["dropped"]) + "."]
    lines += ["", "Size of each split (whole works; tokens of this tokenizer):", "",
              "| split | source | works | characters | tokens |", "|---|---|---|---|---|"]
    for split, by_source in r["sizes"].items():
        for src, s in sorted(by_source.items()):
            lines.append(f"| {split} | {src} | {s['works']} | {s['chars']:,} | {s['tokens']:,} |")
    if corpus.get("heldout_in_train"):
        worst = max(corpus["heldout_in_train"].items(), key=lambda kv: kv[1])
        lines += ["", f"Leak check: at most {worst[1]:.2%} of a held-out work's 13-word shingles occur in the training "
                      f"works (`{worst[0]}`)."]
    for split in ("calib", "eval", "dev"):
        if split in r["splits"]:
            lines.append(f"- `{split}.txt`: {', '.join(r['splits'][split])}.")
    if any("wordnet" in d["file"] for d in corpus["downloads"]):
        lines += ["", WORDNET_NOTICE]
    return "\n".join(lines) + "\n"


def _files_section(r: dict) -> str:
    a, t = r["args"], r["tasks"]
    cut = (f"each work cut to at most {a['heldout_work_chars']} characters" if a.get("heldout_work_chars")
           else "the joined text cut to at most 300000 characters")
    if a.get("heldout") == "passages":
        tasks = (f"- `cloze.jsonl` ({t.get('cloze', 0)} items; `dev_cloze.jsonl` {t.get('dev_cloze', 0)}): LAMBADA-style "
                 "`{\"text\", \"work\"}` passages of whole sentences from the held-out works, ending with the last word of "
                 "their last sentence (the target), which occurs earlier in the passage and is not a stop word "
                 "(`rllm/heldout.py`).\n"
                 f"- `mc.jsonl` ({t.get('mc', 0)} items; `dev_mc.jsonl` {t.get('dev_mc', 0)}): HellaSwag-shaped "
                 "`{\"context\", \"choices\" (4), \"label\", \"work\"}`: the sentence that follows the context, against three "
                 "sentences from elsewhere in the same work. Score `context + \" \" + choice`.\n")
    else:
        tasks = (f"- `cloze.jsonl` ({t.get('cloze', 0)} items): LAMBADA-style `{{\"text\": passage}}` from the evaluation "
                 "works; the target is the passage's last word: line-final content words, preferring ones already seen.\n"
                 f"- `mc.jsonl` ({t.get('mc', 0)} items): `{{\"context\", \"choices\" (4), \"label\"}}`; the true choice is "
                 "the line that follows the context, the 3 others are lines from elsewhere in those works.\n")
    model = ("- `model.safetensors`: the state dict of `rllm.model.RWKV`; `config.json`: `dataclasses.asdict(RWKVConfig)`.\n"
             if "config" in r else "")
    return (f"Files:\n{model}- `tokenizer.json`: byte-level BPE trained on the training works; `<|endoftext|>` = id 0 "
            f"separates documents.\n- `calib.txt`, `eval.txt`, `dev.txt`: the held-out works of each split, {cut}; "
            "calibration chooses thresholds and the kept checkpoint, development chooses among methods, evaluation is "
            f"only scored.\n{tasks}- `train_report.json`: arguments, data hashes, sizes, timings, the curve and every "
            "figure here.\n")


def write_readme(out: Path, report: dict, command: str) -> None:
    text = "\n".join([f"# {report['name']}\n", _model_section(report, command), _ppl_section(report),
                      _data_section(report), _files_section(report)])
    (Path(out) / "README.md").write_text(text)
