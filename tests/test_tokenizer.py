"""Tokenizer: byte-level BPE round trip, <|endoftext|> = 0, loading any tokenizer.json, load errors."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from rllm.tokenizer import EOT, encode, encode_documents, eot_id, load_tokenizer, train_tokenizer

TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
    "And by opposing end them. To die--to sleep,\nNo more; and by a sleep to say we end\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=300)


def test_round_trip_and_special_token(tok):
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id(EOT) == 0 == eot_id(tok)
    for s in ["To be, or not to be", "  odd   spacing\n\n\tand tabs", "unseen bytes: é ü — ☃ 🎭", ""]:
        ids = encode(tok, s)
        assert tok.decode(ids, skip_special_tokens=False) == s
        assert 0 not in ids
    stream = encode_documents(tok, ["a b", "c d"])
    assert stream[0] == 0 and stream.count(0) == 2
    assert tok.decode(stream, skip_special_tokens=True) == "a bc d"


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXT, vocab_size=100)


def test_save_and_load_file_or_dir(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    for p in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        t2 = load_tokenizer(p)
        assert encode(t2, "To be, or not") == encode(tok, "To be, or not")


def test_loads_foreign_tokenizer_without_our_special_tokens(tmp_path):
    # A GPT-NeoX-like file: different special tokens, different file name in the directory.
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|padding|>", "<|pad2|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "20B_tokenizer.json"))
    t2 = load_tokenizer(tmp_path)
    assert t2.get_vocab_size() == 280 and eot_id(t2) is None
    assert encode_documents(t2, ["To be"]) == encode(t2, "To be")


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(missing)
    with pytest.raises(ValueError, match="no tokenizer.json in directory"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="cannot load tokenizer .*tokenizer.json") as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)
    bad.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(bad)
