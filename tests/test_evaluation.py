"Answer-quality metrics: ROUGE-L edge cases, the TF-IDF classifier, evaluate() error handling, retrieval parity."
import itertools, random, subprocess, sys

import numpy as np
import pytest

from bankllm.testing import EchoAdapter
from bankllm.data import bitext_pairs
from bankllm.evaluation import (IntentClassifier, RetrievalAdapter, Tfidf, evaluate, lcs_length, quality_table,
                                retrieval_baseline, rouge_l, score_answers, top_confusions, truncate_words)


def lcs_brute(a, b):
    "LCS length by trying every subsequence of the shorter sequence, longest first"
    if len(a) > len(b): a, b = b, a
    def is_subseq(s, t):
        it = iter(t)
        return all(x in it for x in s)
    for k in range(len(a), 0, -1):
        if any(is_subseq(c, b) for c in itertools.combinations(a, k)): return k
    return 0


def test_lcs_matches_brute_force():
    rng = random.Random(1)
    for _ in range(400):
        a, b = ([rng.choice("xyz") for _ in range(rng.randint(0, 8))] for _ in range(2))
        assert lcs_length(a, b) == lcs_brute(a, b), (a, b)


@pytest.mark.parametrize("cand, ref", [("", ""), ("", "block my card"), ("block my card", ""), ("!!", "?")])
def test_rouge_l_of_empty_text_is_zero(cand, ref):
    assert rouge_l(cand, ref) == 0.0


def test_rouge_l_identical_case_and_punctuation_insensitive():
    assert rouge_l("Block my card.", "block MY card") == 1.0
    assert rouge_l("no overlap here", "something else entirely") == 0.0


def test_rouge_l_is_a_symmetric_f1():
    c, r = "call support and block the card", "please call customer support to block your card"
    assert rouge_l(c, r) == pytest.approx(4/7)                       # LCS 4, P 4/6, R 4/8
    rng = random.Random(2)
    for _ in range(50):
        a, b = (" ".join(rng.choice("abcde") for _ in range(rng.randint(1, 10))) for _ in range(2))
        assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))
        assert 0.0 <= rouge_l(a, b) <= 1.0


def test_tfidf_rows_are_unit_length_and_unknown_text_is_zero():
    X = Tfidf.fit(["cancel my transfer", "block my card", "card card card"]).transform(
        ["my card", "cancel", "zzz"])
    norms = np.linalg.norm(X.to_dense(), axis=1)
    assert norms == pytest.approx([1, 1, 0])


def test_classifier_fits_and_predicts_a_toy_corpus():
    clf = IntentClassifier.fit(["block my card", "my card is lost block it", "cancel the transfer",
                                "cancel my bank transfer please", "where is the nearest atm", "find an atm"],
                               ["block_card"]*2 + ["cancel_transfer"]*2 + ["find_ATM"]*2)
    assert clf.labels == ["block_card", "cancel_transfer", "find_ATM"]
    assert clf.predict(["please block the card", "atm near me", "cancel that transfer"]) == \
        ["block_card", "find_ATM", "cancel_transfer"]
    assert clf.predict_one("") is None and clf.predict_one("qwerty") is None
    assert clf.predict([]) == []


@pytest.fixture(scope="module")
def train():
    return bitext_pairs("train")


@pytest.fixture(scope="module")
def clf(train):
    return IntentClassifier.fit(train.answer, train.intent)


@pytest.fixture(scope="module")
def toy():
    return bitext_pairs("dev").groupby("intent").head(1).head(5).reset_index(drop=True)


async def test_evaluate_counts_errors_of_a_failing_adapter_without_raising(toy, clf):
    rep = await evaluate(EchoAdapter("echo_broken", fail_with=RuntimeError("x")), toy, clf, concurrency=2)
    assert (rep.n, rep.errors, rep.topic_accuracy, rep.rouge_l) == (5, 5, 0.0, 0.0)
    assert rep.rows.answer.tolist() == [""]*5
    assert rep.rows.error.str.contains("RuntimeError: x").all()
    assert rep.rows.predicted_intent.isna().all()
    assert quality_table([rep]).errors.tolist() == [5]


async def test_evaluate_keeps_row_order_and_records_latency_and_tokens(toy, clf):
    rep = await evaluate(EchoAdapter("echo", delay_s=0.01), toy, clf, concurrency=5)
    assert rep.errors == 0 and rep.rows.error.isna().all()
    assert rep.rows.question.tolist() == toy.question.tolist()
    assert all(a.startswith(f"You asked: {q}") for a, q in zip(rep.rows.answer, toy.question))
    assert (rep.rows.latency_ms > 0).all() and (rep.rows.tokens > 0).all()
    s = rep.summary()
    assert s["n"] == 5 and s["latency_ms_p50"] > 0 and s["tokens_mean"] > 0
    assert (await evaluate(EchoAdapter("echo"), toy, clf, limit=2)).n == 2


async def test_evaluate_rejects_bad_input(toy, clf):
    with pytest.raises(ValueError, match="concurrency"): await evaluate(EchoAdapter(), toy, clf, concurrency=0)
    with pytest.raises(ValueError, match="answer"): await evaluate(EchoAdapter(), toy[["question", "intent"]], clf)
    with pytest.raises(ValueError, match="no pairs"): await evaluate(EchoAdapter(), toy.head(0), clf)


async def test_retrieval_adapter_matches_retrieval_baseline(train, clf):
    sample = bitext_pairs("dev").sample(40, random_state=0).reset_index(drop=True)
    base = retrieval_baseline(train, sample, clf, max_words=60)
    adapter = RetrievalAdapter(train_pairs=train)
    rep = await evaluate(adapter, sample, clf, max_tokens=60, concurrency=4)
    assert rep.rows.answer.tolist() == base.rows.answer.tolist()
    assert (rep.topic_accuracy, rep.rouge_l, rep.n) == (base.topic_accuracy, base.rouge_l, base.n)
    assert rep.name == "retrieval" and rep.errors == 0
    assert (rep.rows.tokens <= 60).all()
    r = await adapter.generate(train.question[3], max_tokens=4000, temperature=0)
    assert r.text == train.answer[3] and r.confidence == pytest.approx(1.0) and r.finish_reason == "stop"


def test_truncate_words_keeps_spacing():
    assert truncate_words("1. Open\n2. Tap  Cards now", 4) == "1. Open\n2. Tap"
    assert truncate_words("", 3) == ""


def test_top_confusions_counts_wrong_pairs(clf, toy):
    answers = ["block my card"]*len(toy)
    rep = score_answers("x", toy, answers, clf)
    conf = top_confusions(rep, n=2)
    assert conf.columns.tolist() == ["intent", "predicted_intent", "count"]
    assert len(conf) <= 2 and (conf["count"] >= 1).all()


def test_import_is_light():
    code = "import sys, bankllm.evaluation; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_auroc_against_a_direct_count_of_pairs():
    from bankllm.evaluation import auroc
    rng = random.Random(5)
    for _ in range(50):
        n = rng.randint(2, 30)
        s = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(n)]
        y = [rng.random() < 0.5 for _ in range(n)]
        if len(set(y)) < 2: continue
        pos, neg = [a for a, t in zip(s, y) if t], [a for a, t in zip(s, y) if not t]
        direct = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert auroc(s, y) == pytest.approx(direct)
    with pytest.raises(ValueError): auroc([0.5, 0.6], [True, True])


def test_calibration_bins_and_credential_asks_in_rows():
    from bankllm.evaluation import calibration
    dev = bitext_pairs("dev").head(3)
    rep = score_answers("x", dev, ["Please provide me with your {{Card Number}}.", dev.answer[1], ""],
                        finish=["stop", "length", None], confidence=[0.95, 0.15, None])
    assert list(rep.rows.credential_ask) == [True, False, False]
    cal = calibration(rep.rows, bins=10)
    assert list(cal.answers) == [1, 1] and cal.confidence.tolist() == pytest.approx([0.15, 0.95])


async def test_evaluate_sends_each_questions_history():
    seen = []
    class Recorder(EchoAdapter):
        async def _generate(self, prompt, max_tokens, temperature, **kw):
            seen.append(kw.get("history"))
            return await super()._generate(prompt, max_tokens, temperature)
    dev = bitext_pairs("dev").head(2).assign(history=[[], [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]])
    rep = await evaluate(Recorder("echo_test_0.0.0"), dev)
    assert seen == [None, dev.history[1]] and rep.errors == 0


def test_goals_table_and_baselines_on_every_set():
    from bankllm.data import eval_sets, training_mix
    from bankllm.evaluation import GOAL_COLUMNS, default_classifier, goals_table, set_baselines
    sets = eval_sets("dev", per_intent=1, follow_ups_per_intent=1)
    t = goals_table(set_baselines(training_mix(), sets, default_classifier())).set_index("name")
    assert list(t.reset_index().columns) == GOAL_COLUMNS
    assert t.loc["reference", "scope_honesty"] == 1.0 and t.loc["reference", "bitext_rouge_l"] == 1.0
    assert t.loc["retrieval", "real_topic"] > t.loc["constant", "real_topic"]
    assert t.loc["retrieval", "follow_up"] < 0.5  # single-turn retrieval loses the first turn's topic


def test_only_an_answer_close_to_the_hand_off_counts_as_one():
    from bankllm.data import OUT_OF_SCOPE, SCOPE_ANSWER
    from bankllm.evaluation import default_classifier
    clf = default_classifier()
    assert clf.predict([SCOPE_ANSWER, SCOPE_ANSWER[:90]]) == [OUT_OF_SCOPE, OUT_OF_SCOPE]
    short = ["You asked: can you help with", "I can help with that"]  # nearest to the hand-off's wide vocabulary
    floorless = IntentClassifier(clf.tfidf, clf.labels, clf.centroids)
    assert floorless.predict(short) == [OUT_OF_SCOPE, OUT_OF_SCOPE]
    assert OUT_OF_SCOPE not in clf.predict(short)  # but too far from it to be one
