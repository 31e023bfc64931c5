"""The transformers engine decodes concurrent answers together (iteration-level batching over the model's own cache).
A tiny Llama and a LoRA adapter with random weights are built here, in float32: batched answers must equal the answers
one by one, token for token, whatever the prompt lengths, the arrival times and the batch size; per-request sampling
settings keep their own generator; a client that leaves frees its row; a failing pass fails its batch, not the engine."""
import asyncio

import pytest
import torch

from bankllm.adapters.base import AdapterError
from bankllm.adapters.qlora import QLoRAAdapter, TokenRequest, TransformersEngine
from bankllm.config import get_config
from bankllm.qlora import QLoRAConfig, add_lora, load_base
from bankllm.tokenizer import BPETokenizer
from bankllm.training import save_checkpoint
from bankllm.transformer import BankingLLM, ModelConfig

TEXT = ["Where is my card?", "How do I close my account?", "I need a loan", "Fees abroad?",
        "It is on its way, usually within five days.", "Visit a branch with your ID.", "Apply in the app under Loans."]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    "A tiny custom base (exported to the Llama format by the QLoRA code) and a LoRA adapter whose B is not zero"
    tmp = tmp_path_factory.mktemp("batching")
    mp = pytest.MonkeyPatch(); mp.setenv("BANKLLM_CACHE_DIR", str(tmp/"cache"))
    tok = BPETokenizer.train(TEXT * 5, vocab_size=300)
    torch.manual_seed(0)
    model = BankingLLM(ModelConfig.tiny(vocab_size=tok.vocab_size, n_embd=64, n_head=4, n_kv_head=2, block_size=256))
    ckpt = save_checkpoint(model, tok, tmp/"tiny_custom")
    base, _ = load_base(ckpt, quantize=False, device="cpu")
    pm = add_lora(base, QLoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.2)  # an adapter that changes the answers
    pm.save_pretrained(tmp/"adapter")
    yield tmp/"adapter", ckpt
    mp.undo()


@pytest.fixture(scope="module")
def make(adapter):
    engines = []
    def make(max_batch=16, quantize=False, threads=1):
        e = TransformersEngine(adapter[0], str(adapter[1]), quantize=quantize, device="cpu", max_batch=max_batch, threads=threads)
        e.stops = set()  # a random model says its end token early; without it every answer runs to `max_tokens`
        engines.append(e); return e
    yield make
    for e in engines: e.close()


PROMPTS = [[5, 9, 12], list(range(20, 61)), [7] * 11, list(range(100, 117)), [3, 4], list(range(40, 140, 3))]


async def answer(eng, ids, n=20, temperature=0.0, **kw):
    return [t async for t, _ in eng.stream_tokens(ids, n, temperature, **kw)]


def alone(eng, ids, n=20):
    "Greedy decoding with the model's own cache, one sequence, no engine: the reference"
    from transformers import DynamicCache
    out, x, cache = [], torch.tensor([ids]), DynamicCache()
    with torch.inference_mode():
        for _ in range(n):
            r = eng.model(input_ids=x, use_cache=True, **{eng.cache_arg: cache})
            out.append(int(r.logits[0, -1].argmax())); x = torch.tensor([[out[-1]]])
    return out


def beam_alone(eng, ids, beams, n, alpha, greedy_only=()):
    "Beam search with a full forward pass per step (no cache, no engine): the reference"
    from bankllm.beam import BeamSearch
    s = BeamSearch(beams, alpha, eng.stops, n, greedy_only)
    with torch.inference_mode():
        logits = eng.model(input_ids=torch.tensor([ids])).logits[:, -1].float()
        while True:
            s.advance(logits.log_softmax(-1))
            if s.done: return s.best().toks
            logits = eng.model(input_ids=torch.tensor([ids + h.toks for h in s.live])).logits[:, -1].float()


async def test_beam_searches_in_the_batch_equal_beam_search_alone(make):
    "Beam requests share the batch with greedy ones, their cache rows reordered every step, and give the reference's tokens"
    eng = make(max_batch=7)
    eng.stops = {3, 17}  # so some hypotheses end early and wait as candidates
    spec = [(4, 20, 2.0), (1, 20, 0.0), (3, 15, 1.0), (2, 25, 0.0)]
    outs = await asyncio.gather(*[answer(eng, p, n, beams=b, length_penalty=a) for p, (b, n, a) in zip(PROMPTS, spec)])
    for p, (b, n, a), o in zip(PROMPTS, spec, outs):
        assert o == (beam_alone(eng, p, b, n, a) if b > 1 else (await answer(make(), p, n)))
    assert eng.batch_stats()["most_rows"] <= 7
    with pytest.raises(ValueError, match="temperature 0"): await answer(eng, PROMPTS[0], 5, temperature=0.5, beams=2)
    eng.stops = set()


async def test_batched_greedy_answers_equal_the_answers_one_by_one(make):
    eng = make()
    ref = [alone(eng, p) for p in PROMPTS]
    one_by_one = [await answer(eng, p) for p in PROMPTS]
    together = await asyncio.gather(*[answer(eng, p) for p in PROMPTS])
    assert one_by_one == ref and list(together) == ref
    assert eng.batch_stats()["most_rows"] == len(PROMPTS)
    assert len({tuple(a) for a in ref}) > 1  # the prompts lead to different answers


async def test_the_driver_runs_torch_on_the_threads_it_is_given(make):
    "One thread by default (`BANKLLM_QLORA_THREADS`): one OpenMP team per process (07b_batching, section 5)"
    for threads in (1, 2):
        eng = make(threads=threads)
        await answer(eng, PROMPTS[0], n=2)
        assert eng.batch_stats()["threads"] == threads
    assert get_config().qlora_threads == 1


async def test_answers_that_join_mid_flight_or_wait_for_a_row_are_unchanged(make):
    eng = make(max_batch=3)
    ref = [alone(eng, p, 24) for p in PROMPTS]
    async def late(i):
        await asyncio.sleep(0.01 * i)  # arrivals spread over the first steps of the earlier answers
        return await answer(eng, PROMPTS[i], 24)
    got = await asyncio.gather(*[late(i) for i in range(len(PROMPTS))])
    assert list(got) == ref
    s = eng.batch_stats()
    assert s["most_rows"] <= 3 and s["prefills"] == len(PROMPTS)  # never more rows than the setting


def test_joining_mid_answer_by_hand(make):
    "The scheduler's moves driven step by step (no thread): B joins after A's 5th step, C after B's; then both leave"
    eng = make()
    ref = {k: alone(eng, PROMPTS[i], 12) for k, i in (("a", 1), ("b", 0), ("c", 5))}
    got = {k: [] for k in ref}
    req = lambda k, i: TokenRequest(PROMPTS[i], 12, 0.0, None, None, None, lambda x, g=got[k]: (isinstance(x, tuple) and g.append(x[0])) or True)
    arrive, sizes = {0: [req("a", 1)], 5: [req("b", 0)], 8: [req("c", 5)]}, []
    for step in range(40):
        eng._admit(arrive.get(step, [])); eng._drop()
        if eng.batch.rows: eng._step(); eng._drop()
        sizes.append(len(eng.batch))
    assert got == ref
    assert max(sizes) == 3 and sizes[-1] == 0 and eng.batch.kv is None  # all three together, then every row freed


async def test_each_request_keeps_its_sampling_settings_and_generator(make):
    eng = make()
    kinds = [dict(temperature=0.9, seed=1), dict(temperature=0.7, top_k=5, seed=2), dict(temperature=1.2, top_p=0.8, seed=3),
             dict(temperature=0.0)]
    ref = [await answer(eng, PROMPTS[i], **k) for i, k in enumerate(kinds)]
    together = await asyncio.gather(*[answer(eng, PROMPTS[i], **k) for i, k in enumerate(kinds)])
    assert list(together) == ref
    assert ref[0] != await answer(eng, PROMPTS[0], temperature=0.9, seed=4)  # another seed, another answer


async def test_stop_tokens_and_max_tokens_end_each_answer_on_its_own(make):
    eng = make()
    greedy = alone(eng, PROMPTS[1], 12)
    eng.stops = {greedy[5]}  # this answer stops at its 6th token, after yielding it
    stop_at = greedy.index(greedy[5]) + 1
    a, b = await asyncio.gather(answer(eng, PROMPTS[1], 12), answer(eng, PROMPTS[0], 3))
    assert a == greedy[:stop_at] and len(b) <= 3


async def test_a_client_that_leaves_frees_its_row(make):
    eng = make()
    s = eng.stream_tokens(PROMPTS[1], 10_000, 0.0)
    await anext(s); await s.aclose()
    for _ in range(200):
        if eng.batch_stats()["running"] == 0: break
        await asyncio.sleep(0.01)
    assert eng.batch_stats()["running"] == 0 and eng.batch_stats()["steps"] < 200
    assert await answer(eng, PROMPTS[0]) == alone(eng, PROMPTS[0])


async def test_a_failing_pass_fails_its_batch_and_the_engine_serves_on(make, monkeypatch):
    eng = make()
    real, failed = eng.model.forward, []
    def broken(*a, **kw):
        if kw["input_ids"].shape[0] == 2 and not failed:  # the first pass that carries both answers
            failed.append(1); raise RuntimeError("out of memory")
        return real(*a, **kw)
    monkeypatch.setattr(eng.model, "forward", broken)
    results = await asyncio.gather(answer(eng, PROMPTS[0]), answer(eng, PROMPTS[1]), return_exceptions=True)
    assert failed and all(isinstance(r, AdapterError) and "out of memory" in str(r) for r in results)
    monkeypatch.undo()
    assert await answer(eng, PROMPTS[2]) == alone(eng, PROMPTS[2])


def test_blocking_callers_get_the_same_tokens(make):
    eng = make()
    assert [t for t, _ in eng.tokens(PROMPTS[3], 20, 0.0)] == alone(eng, PROMPTS[3])


async def test_closed_engine_finishes_and_lets_go(make):
    eng = make()
    task = asyncio.ensure_future(answer(eng, PROMPTS[1], 30))
    await asyncio.sleep(0.05)
    eng.close()
    assert await task == alone(eng, PROMPTS[1], 30)  # the answer in flight is finished
    with pytest.raises(AdapterError, match="unloaded"): await answer(eng, PROMPTS[0])
    for _ in range(100):
        if eng.driver is None: break
        await asyncio.sleep(0.01)
    assert eng.driver is None


async def test_4bit_batched_answers_agree_with_one_by_one(make):
    "NF4 4-bit base: the padded batch goes through other kernels' shapes; report how many tokens agree"
    eng = make(quantize=True)
    assert eng.quantized
    one_by_one = [await answer(eng, p) for p in PROMPTS]
    together = await asyncio.gather(*[answer(eng, p) for p in PROMPTS])
    agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(one_by_one, together)]
    print("4-bit: tokens agreeing before the first difference:", agree)
    assert sum(agree) / sum(map(len, one_by_one)) >= 0.9


async def test_the_adapter_admits_as_many_answers_as_the_batch_holds(adapter):
    cfg = get_config(qlora_engine="transformers", qlora_adapter=str(adapter[0]), qlora_base=str(adapter[1]),
                     qlora_load_in_4bit=False, qlora_max_batch=5)
    qa = QLoRAAdapter(config=cfg)
    assert qa.admission.concurrency == 5
    rs = await asyncio.gather(*[qa.generate(q, max_tokens=8, temperature=0) for q in TEXT[:4]])
    one = [await qa.generate(q, max_tokens=8, temperature=0) for q in TEXT[:4]]
    assert [r.text for r in rs] == [r.text for r in one] and all(r.confidence is not None for r in rs)
    assert qa._impl.max_batch == 5 and qa._impl.batch_stats()["most_rows"] > 1
    qa._unload()


def test_the_setting_is_bounded():
    from pydantic import ValidationError
    for bad in (0, 10_000):
        with pytest.raises(ValidationError): get_config(qlora_max_batch=bad)
    assert get_config().qlora_max_batch == 16


async def test_a_client_that_leaves_the_adapters_stream_frees_its_row(adapter):
    cfg = get_config(qlora_engine="transformers", qlora_adapter=str(adapter[0]), qlora_base=str(adapter[1]),
                     qlora_load_in_4bit=False, fill_placeholders=False)
    qa = QLoRAAdapter(config=cfg)
    await qa.load()
    qa._impl.stops = set()  # a random model: no early end, so only leaving can end this answer early
    s = qa.stream(TEXT[0], max_tokens=1000, temperature=0)
    await anext(s); await s.aclose()
    for _ in range(200):
        if qa._impl.batch_stats()["running"] == 0: break
        await asyncio.sleep(0.01)
    assert qa._impl.batch_stats()["running"] == 0 and qa._impl.batch_stats()["steps"] < 200
    qa._unload()


async def test_the_engine_keeps_the_guarded_opening_to_greedys_own_path(make):
    "With `greedy_only`, the engine's beam answers equal the reference's under the same rule, beside unguarded ones"
    eng = make(max_batch=9)
    eng.stops, differ = {3, 17}, 0
    for p in PROMPTS:
        free, greedy = await answer(eng, p, 15, beams=4, length_penalty=1.0), await answer(eng, p, 15)
        guard = tuple(free[:2])
        got = await asyncio.gather(answer(eng, p, 15, beams=4, length_penalty=1.0, greedy_only=guard),
                                   answer(eng, p, 15, beams=4, length_penalty=1.0))
        assert got[0] == beam_alone(eng, p, 4, 15, 1.0, guard) and got[1] == free
        if free[:2] != greedy[:2]: differ += 1; assert tuple(got[0][:2]) != guard  # off greedy's path: not taken
        else: assert got[0] == free  # greedy's own opening: nothing changes
    assert differ  # some prompts open differently with beams than greedily
    eng.stops = set()


def test_answer_ids_are_the_tokens_the_model_writes_after_its_chat_prompt(make):
    from bankllm.beam import SCOPE_OPENING
    from bankllm.data import SCOPE_ANSWER, chat_messages
    eng = make()
    ids = eng.answer_ids(SCOPE_OPENING)
    prompt = eng.prompt_ids("hi", None)
    full = eng.tok.apply_chat_template(chat_messages("hi") + [dict(role="assistant", content=SCOPE_ANSWER)], tokenize=True,
                                       return_dict=True)["input_ids"]
    assert list(full[len(prompt):len(prompt) + len(ids)]) == list(ids) and eng.tok.decode(ids) == SCOPE_OPENING
