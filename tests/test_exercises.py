"Every self-check accepts its reference answer and rejects a wrong one, with a reason"
import math

import pytest

from bankllm.data import BANKING77_MAP, bitext_pairs, placeholders_in
from bankllm.exercises import EXERCISES, GPT2_PATTERN, bytes_per_token, check_exercise
from bankllm.tokenizer import BPETokenizer
from bankllm.training import collate, lr_at
from bankllm.transformer import BankingLLM, ModelConfig


def _gpt2(pattern=GPT2_PATTERN):
    tok = BPETokenizer.train(bitext_pairs("train").answer[:300].tolist(), 512, pattern=pattern)
    return tok, bytes_per_token(tok, bitext_pairs("dev").answer[:100].tolist())

def _collate_all(examples, pad_id):
    x, y = collate(examples, pad_id)
    for i, e in enumerate(examples): y[i, :len(e.ids) - 1] = y.new_tensor(e.ids[1:])
    return x, y

def _lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1): cur.append(prev[j-1] + 1 if x == y else max(prev[j], cur[-1]))
        prev = cur
    return prev[-1]

_names = lambda: bitext_pairs("train").answer.map(placeholders_in).explode().dropna()

CASES = {  # key -> (reference answer, wrong answer), built lazily
    "01.1": lambda: (sum(m is not None for m, _ in BANKING77_MAP.values()), 77),
    "01.2": lambda: (_names().nunique(), len(_names())),
    "02.1": lambda: (_gpt2(), _gpt2(pattern=BPETokenizer().pattern)),
    "02.2": lambda: (["aa", "ab", "aaab"], ["aa", "aaa", "aaab"]),
    "03.1": lambda: (BankingLLM(ModelConfig(n_kv_head=1)).new_cache().memory_mb() * 2**20, 2 * 6 * 4 * 320 * 64 * 4),
    "03.2": lambda: (list(range(4, 10)), list(range(10))),
    "03.3": lambda: (4096 * 256, 2 * 4096 * 256),
    "07.1": lambda: (_collate_all, collate),
    "07.2": lambda: (lr_at, lambda s, c: c.lr * 0.5 * (1 + math.cos(math.pi * s / c.steps))),
    "06.1": lambda: (2/3, 0.6),
    "06.2": lambda: (_lcs, lambda a, b: len(set(a) & set(b))),
    "06.3": lambda: (5/6, 0.5),
    "08.1": lambda: (4 * 8 * (4 * (256 + 256) + 3 * (256 + 704)), 4 * 16 * (4 * 512 + 3 * 960)),
    "08.2": lambda: (4 + 8/32 + 32/(32*256), 5.0),
}

def test_every_exercise_has_a_case(): assert set(CASES) == set(EXERCISES)

@pytest.mark.parametrize("key", sorted(CASES))
def test_check(key):
    right, wrong = CASES[key]()
    v = check_exercise(key, right)
    assert v, v
    assert str(v).startswith(f"{key} right: ")
    w = check_exercise(key, wrong)
    assert not w and w.why and str(w).startswith(f"{key} not yet: ")

def test_unknown_key_lists_the_checked_ones():
    with pytest.raises(KeyError, match="01.1"): check_exercise("99.9", 0)

def test_an_answer_that_raises_is_not_yet():
    v = check_exercise("07.1", lambda ex, pad: 1/0)
    assert not v and "ZeroDivisionError" in v.why
