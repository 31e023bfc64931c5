"Byte-level BPE: exact round trips for any text, save/load, and the fast trainer against a naive reference."
import json, pickle, subprocess, sys
from collections import Counter
from unittest.mock import patch

import pytest

from bankllm.data import SPECIAL_TOKENS, STOP_TOKENS
from bankllm import tokenizer as tk
from bankllm.tokenizer import BPETokenizer, learn_merges, merge_pair, pretokenize, train_banking_tokenizer

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # a dev dependency; without it the property tests below are skipped and the rest still run
    given = None

CORPUS = ["Please contact our customer support team at {{Customer Support Phone Number}}.",
          "To transfer money, log in to your account.\n\n1. Tap Transfers.\n2. Choose the account.",
          "I'd like to cancel my card 4111 1111 1111 1111, it's been lost!", "Überweisung à Zoë 💳 银行卡挂失\tok"] * 3
TOK = BPETokenizer.train(CORPUS, vocab_size=256 + 120 + len(SPECIAL_TOKENS))
HARD = ["Überweisung à Zoë", "card 💳 ok 👍🏽 👨‍👩‍👧", "银行卡挂失", "4111 1111 1111 1111", "{{Customer Support Phone Number}}",
        "line one\n\tline two\r\n", "", " ", "\n", "  spaced  out  ", "I'D WE'LL it's", "a_b __init__ x2²",
        "e\u0301 combining", "\x00\x7f nul and del", "\ud7ff\ue000\U0010ffff", "<|user|>Hi<|end|>", "<|<|end|>|>"]

def learn_merges_reference(text, n_merges):
    "The notebook's naive trainer: recount every pair of every chunk before each merge"
    chunks = [list(c.encode("utf-8")) for c in pretokenize(text)]
    merges = {}
    for idx in range(256, 256 + n_merges):
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:]))
        if not counts: break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges[pair] = idx
        chunks = [merge_pair(ids, pair, idx) for ids in chunks]
    return merges

@pytest.mark.parametrize("text", HARD)
@pytest.mark.parametrize("allow_special", [True, False])
def test_round_trip_hard_strings(text, allow_special):
    assert "".join(pretokenize(text)) == text
    assert TOK.decode(TOK.encode(text, allow_special)) == text

def test_specials_are_single_ids_only_when_allowed():
    ids = TOK.encode("<|user|>Hi<|end|>")
    assert ids[0] == TOK.id_of("<|user|>") and ids[-1] == TOK.end_id
    plain = TOK.encode("<|user|>Hi<|end|>", allow_special=False)
    assert not set(plain) & set(TOK.special_tokens.values())
    assert TOK.decode(ids, skip_special=True) == "Hi"

def test_vocab_layout_and_special_ids():
    assert TOK.vocab_size == 256 + len(TOK.merges) + len(SPECIAL_TOKENS) == len(TOK.vocab)
    assert list(TOK.special_tokens) == list(SPECIAL_TOKENS)
    assert sorted(TOK.special_tokens.values()) == list(range(TOK.vocab_size - len(SPECIAL_TOKENS), TOK.vocab_size))
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.end_id) == tuple(TOK.id_of(t) for t in
                                                                    ("<|pad|>", "<|bos|>", "<|eos|>", "<|end|>"))
    assert TOK.stop_ids == tuple(TOK.id_of(t) for t in STOP_TOKENS)
    with pytest.raises(KeyError, match="not a special token"): TOK.id_of("<|unk|>")

def test_errors():
    with pytest.raises(ValueError, match="too small"): BPETokenizer.train(CORPUS, vocab_size=256)
    with pytest.raises(ValueError, match="unknown token id"): TOK.decode([TOK.vocab_size])
    assert TOK.decode(list("💳".encode())[:3]) == "\ufffd"  # a cut character never raises

def test_specials_are_not_learned():
    tok = BPETokenizer.train(["<|user|>hello<|end|>"] * 50, vocab_size=256 + 10 + len(SPECIAL_TOKENS))
    assert all(b"<|" not in v and b"|>" not in v for i, v in tok.vocab.items() if i < 256 + len(tok.merges))

def test_runs_out_of_pairs():
    tok = BPETokenizer.train(["ab"], vocab_size=1000)
    assert len(tok.merges) == 1 and tok.vocab_size == 256 + 1 + len(SPECIAL_TOKENS)
    assert tok.encode("ab") == [256]

def test_save_load_round_trip(tmp_path):
    path = TOK.save(tmp_path/"sub"/"tok.json")
    state = json.loads(path.read_text(encoding="utf-8"))
    assert state["version"] == 1 and state["merges"][0] == list(next(iter(TOK.merges)))
    loaded = BPETokenizer.load(path)
    assert loaded.merges == TOK.merges and list(loaded.merges) == list(TOK.merges)
    assert loaded.special_tokens == TOK.special_tokens and loaded.pattern == TOK.pattern
    assert loaded.encode_batch(HARD + CORPUS) == TOK.encode_batch(HARD + CORPUS)
    (tmp_path/"bad.json").write_text(json.dumps({**state, "version": 99}))
    with pytest.raises(ValueError, match="version 1"): BPETokenizer.load(tmp_path/"bad.json")

def test_pickles():
    tok = pickle.loads(pickle.dumps(TOK))
    assert tok.encode_batch(HARD) == TOK.encode_batch(HARD)

def test_cache_is_bounded():
    tok = BPETokenizer(TOK.merges)
    with patch.object(tk, "_CACHE_SIZE", 3):
        ids = [tok.encode(f"word{i} other{i}") for i in range(10)]
        assert len(tok._cache) <= 3
    assert [TOK.encode(f"word{i} other{i}") for i in range(10)] == ids

def test_fast_trainer_matches_reference():
    text = "\n".join(CORPUS)
    assert list(learn_merges([text], 150).items()) == list(learn_merges_reference(text, 150).items())

def test_banking_tokenizer_reads_train_splits_only():
    seen = []
    def spy(fn):
        def f(split="train", data_dir=None): seen.append(split); return fn(split, data_dir)
        return f
    with patch.object(tk, "bitext_pairs", spy(tk.bitext_pairs)), patch.object(tk, "load_banking77", spy(tk.load_banking77)):
        tok = train_banking_tokenizer(vocab_size=512)
    assert seen == ["train", "train"]
    assert tok.vocab_size == 512 and tok.id_of("<|end|>") == 511
    assert len(tok.encode(" account")) == 1

def test_import_stays_light():
    code = ("import sys, bankllm.tokenizer; "
            "print([m for m in ('torch', 'matplotlib', 'tokenizers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

if given is not None:
    FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

    @FAST
    @given(st.text())
    def test_round_trip_any_text(text):
        assert "".join(pretokenize(text)) == text
        assert TOK.decode(TOK.encode(text)) == text
        assert TOK.decode(TOK.encode(text, allow_special=False)) == text

    @FAST
    @given(st.lists(st.sampled_from(list(SPECIAL_TOKENS)) | st.text(max_size=8), max_size=8).map("".join))
    def test_round_trip_with_specials(text):
        assert TOK.decode(TOK.encode(text)) == text

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.text(alphabet="aab cd.\n1é", max_size=30), min_size=1, max_size=6).map("\n".join),
           st.integers(1, 40))
    def test_fast_trainer_matches_reference_on_random_corpora(text, n_merges):
        assert list(learn_merges([text], n_merges).items()) == list(learn_merges_reference(text, n_merges).items())

    @FAST
    @given(st.text())
    def test_save_load_encodes_the_same(text):
        loaded = _loaded()
        assert loaded.encode(text) == TOK.encode(text)

    _LOADED = []
    def _loaded():
        "TOK after a save/load round trip through a temporary file (made once)"
        if not _LOADED:
            import tempfile
            with tempfile.TemporaryDirectory() as d: _LOADED.append(BPETokenizer.load(TOK.save(f"{d}/t.json")))
        return _LOADED[0]
else:
    def test_property_tests_need_hypothesis():
        pytest.skip("hypothesis is not installed: pip install hypothesis (the dev extra) to run the property tests")
