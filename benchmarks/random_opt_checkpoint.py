"""A random-weight OPT directory of opt-125m's shape, for GPU decode runs where no OPT weights can be downloaded.

    python benchmarks/random_opt_checkpoint.py DIR
    python -m experiments.decode opt_125m --weights DIR --device cuda --tokens 64 [--sparsity 0.7]

Writes transformers' ``save_pretrained`` files, a byte-level BPE tokenizer (vocab.json +
merges.txt, 2,000 tokens trained on rwkv_tiny's calib.txt) and that calib.txt, from which the
decode command calibrates its uniform schedule.
"""
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import OPTConfig, OPTForCausalLM

if len(sys.argv) != 2:
    raise SystemExit(__doc__)
d = Path(sys.argv[1])
d.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cfg = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True)
OPTForCausalLM(cfg).eval().save_pretrained(d)
text = Path("rllm/assets/rwkv_tiny/calib.txt").read_text()
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator([text], trainer)
tok.model.save(str(d))
shutil.copy("rllm/assets/rwkv_tiny/calib.txt", d / "calib.txt")
print("wrote", d)
