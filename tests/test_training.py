"Training pieces that do not teach: masking, batching, schedule, selection, checkpoints and the Hugging Face export."
import random

import pandas as pd
import pytest
import torch

from bankllm.data import format_prompt
from bankllm.tokenizer import BPETokenizer
from bankllm.training import (Example, TrainConfig, TrainResult, collate, export_hf, length_batches, load_checkpoint,
                              lr_at, make_examples, max_answer_at, resolve_checkpoint, save_checkpoint, select_best)
from bankllm.transformer import BankingLLM, ModelConfig

PAIRS = pd.DataFrame({"question": ["Where is my card?", "How do I close my account?", "Zoë needs a loan 💶"],
                      "answer": ["It is on its way. Call {{Customer Support Phone Number}}.",
                                 "Visit {{Company Website URL}} and follow the steps.", "Apply in the app!"]})


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(list(PAIRS.question) + list(PAIRS.answer) * 5, vocab_size=320)


def test_targets_cover_exactly_the_answer(tok):
    ex = make_examples(tok, PAIRS, block_size=200)
    x, y = collate(ex, tok.pad_id)
    for i, e in enumerate(ex):
        got = y[i][y[i] != -100].tolist()
        assert got == e.ids[e.start:]                          # answer + <|end|><|eos|>, nothing of the prompt
        assert x[i, :len(e.ids) - 1].tolist() == e.ids[:-1]   # inputs are the sequence shifted by one
    assert len(tok.encode(format_prompt(PAIRS.question[0]))) == ex[0].start


def test_the_curriculum_cap_cuts_answers_not_prompts(tok):
    ex = make_examples(tok, PAIRS, block_size=200)
    _, y = collate(ex, tok.pad_id, max_answer=3)
    assert ((y != -100).sum(1) <= 4).all()  # 3 answer tokens + the one after them


def test_a_rows_own_answer_cap_and_history_reach_its_example(tok):
    hist = [{"role": "user", "content": "Where is my card?"}, {"role": "assistant", "content": "On its way."}]
    rows = PAIRS.assign(max_answer=pd.array([2, None, None], dtype="Int64"), history=[hist, [], []],
                        system=["Be brief.", "", ""])
    ex = make_examples(tok, rows, block_size=200)
    assert [e.max_answer for e in ex] == [2, None, None]
    assert ex[0].start == len(tok.encode(format_prompt(PAIRS.question[0], "Be brief.", hist)))
    _, y = collate(ex, tok.pad_id)
    assert (y[0] != -100).sum() == 3 and (y[1] != -100).sum() == len(ex[1].ids) - ex[1].start
    _, y = collate(ex, tok.pad_id, max_answer=1)  # the curriculum's cap and a row's cap: the smaller wins
    assert ((y != -100).sum(1) == 2).all()


def test_length_batches_cover_every_example_once():
    ex = [Example(list(range(n)), 1) for n in random.Random(0).choices(range(3, 300), k=203)]
    bs = length_batches(ex, 16, random.Random(1))
    assert sorted(id(e) for b in bs for e in b) == sorted(id(e) for e in ex)
    assert all(len(b) <= 16 for b in bs)


def test_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=200, warmup=20, lr=1e-3, min_lr=1e-5, curriculum=((0.5, 32), (1.0, None)))
    lrs = [lr_at(s, c) for s in range(200)]
    assert lrs[:20] == sorted(lrs[:20]) and max(lrs) == pytest.approx(1e-3)
    assert lrs[20:] == sorted(lrs[20:], reverse=True) and lrs[-1] == pytest.approx(1e-5, rel=1e-2)
    assert (max_answer_at(99, c), max_answer_at(100, c)) == (32, None)


def test_selection_prefers_lower_loss_within_the_topic_tolerance():
    cands = [(200, 0.90, 1.6, "early"), (400, 0.87, 1.2, "late"), (600, 0.70, 0.9, "off-topic")]
    res = TrainResult()
    kept = [c for c in cands if c[1] >= 0.90 - 0.05]
    assert select_best(kept, res) == "late" and res.best_step == 400


@pytest.mark.parametrize("kw", [dict(), dict(n_head=4, n_kv_head=2, n_embd=64), dict(tie_embeddings=False)])
def test_checkpoint_round_trip_and_hf_logits_parity(tok, tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = BankingLLM(ModelConfig.tiny(vocab_size=tok.vocab_size, **kw)).eval()
    m2, t2 = load_checkpoint(save_checkpoint(model, tok, tmp_path / "ckpt"))
    x = torch.tensor([tok.encode(format_prompt("Where is my card?"))])
    with torch.no_grad(): ours = model(x)[0]
    torch.testing.assert_close(m2(x)[0], ours, rtol=0, atol=0)
    assert t2.encode("Zoë 💶 {{Name}}") == tok.encode("Zoë 💶 {{Name}}")
    hf_dir = export_hf(model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad(): theirs = hf(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    hft = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in PAIRS.answer: assert hft.encode(text, add_special_tokens=False) == tok.encode(text)


def test_unknown_checkpoint_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="custom_model_built_0.0.0"): resolve_checkpoint("nope_0.0.0")


def test_the_anneal_phase_draws_only_its_own_examples(tok, monkeypatch):
    import bankllm.training as training
    ex = make_examples(tok, PAIRS, block_size=200)
    main, last = ex[:2], ex[2:]
    seen = []
    real = training.collate
    monkeypatch.setattr(training, "collate", lambda b, pad, cap=None: (seen.append({id(e) for e in b}), real(b, pad, cap))[1])
    torch.manual_seed(0)
    model = BankingLLM(ModelConfig.tiny(vocab_size=tok.vocab_size))
    cfg = TrainConfig(steps=8, batch_size=2, warmup=1, eval_every=100, device="cpu", dtype="fp32", anneal=(0.25, ("x",)))
    training.train(model, tok, main, ex, cfg, progress=False, anneal_ex=last)
    assert all(s <= {id(e) for e in main} for s in seen[:6])  # the first 6 steps: the main examples only
    assert seen[6:8] == [{id(last[0])}] * 2                   # the last quarter: the anneal examples only


def test_each_recipe_is_what_its_shipped_checkpoint_was_trained_with():
    "`RECIPES` reproduces the shipped checkpoints: the same model config, train config and mix as their records"
    from dataclasses import asdict
    from bankllm.training import RECIPES, _mix_arguments, training_record
    for version, (mc, tc, mix) in RECIPES.items():
        rec = training_record(version)
        assert rec["version"] == version and ModelConfig.from_dict(rec["model_config"]) == mc, version
        want = {k: json_list(v) for k, v in asdict(tc).items()}
        got = {k: json_list(v) for k, v in rec["train_config"].items() if k != "device"}  # older records lack newer fields
        assert {k: want[k] for k in got} == got, version
        if mix is None: assert "mix" not in rec["data"]
        else:
            shared = set(rec["data"]["mix"]) & set(_mix_arguments(mix))
            assert {k: rec["data"]["mix"][k] for k in shared} == {k: _mix_arguments(mix)[k] for k in shared}, version


def json_list(v):
    "A record's value as `asdict` would give it after a JSON round trip (tuples become lists)"
    return [json_list(x) for x in v] if isinstance(v, (list, tuple)) else v
