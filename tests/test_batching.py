"Continuous batching: `decode_batch` rows equal `decode_step` alone; `BatchScheduler` gives every request what `generate` gives it alone, whatever shares its steps."
import asyncio, threading, time

import pytest
import torch

from bankllm.adapters.custom import CustomAdapter
from bankllm.batching import BatchScheduler, SeqRequest, packed_weights
from bankllm.beam import beam_search
from bankllm.config import get_config
from bankllm.transformer import BankingLLM, ModelConfig


def peaked(cfg, seed=0, dtype=torch.float32):
    "A random model with larger weights than at initialisation: confident, varied greedy tokens"
    torch.manual_seed(seed)
    m = BankingLLM(cfg).eval().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2: p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("cfg,dtype", [(ModelConfig.tiny(), torch.float32),
                                       (ModelConfig.tiny(n_head=4, n_kv_head=2), torch.float32),
                                       (ModelConfig.tiny(n_head=4, n_kv_head=1, n_layer=3), torch.float32),
                                       (ModelConfig.tiny(n_head=4, n_kv_head=2), torch.bfloat16)])
def test_decode_batch_rows_equal_decode_step_alone(cfg, dtype):
    m = peaked(cfg, dtype=dtype)
    lengths = [1, 5, 23, 2, 40, 11]
    prompts = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    big, singles = m.new_cache(8), [m.new_cache(1) for _ in lengths]
    with torch.inference_mode():
        toks = [int(m(p, cache=big.rows(b))[0][0, -1].argmax()) for b, p in enumerate(prompts)]
        for p, c in zip(prompts, singles): m(p, cache=c)
        pos = torch.tensor(lengths)
        for _ in range(20):
            together = m.decode_batch(torch.tensor(toks), pos, big)
            apart = torch.stack([m.decode_step(t, c, int(q)) for t, c, q in zip(toks, singles, pos)])
            assert (together - apart).abs().max().item() < (0.1 if dtype == torch.bfloat16 else 1e-4)
            assert together.argmax(-1).tolist() == apart.argmax(-1).tolist()
            toks, pos = apart.argmax(-1).tolist(), pos + 1


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_products_equal_plain_products_and_follow_new_weights(dtype):
    "oneDNN's packed weights change where the products run, not what they give; a weight change repacks"
    m = peaked(ModelConfig.tiny(), seed=3, dtype=dtype)
    toks, pos = torch.tensor([5, 9, 1]), torch.tensor([0, 0, 0])
    def both():
        a, b = m.new_cache(3), m.new_cache(3)
        return m.decode_batch(toks, pos, a), m.decode_batch(toks, pos, b, packed=False)
    packed, plain = both()
    assert packed_weights(m.decode_weights()) is not None
    assert (packed - plain).abs().max().item() < (0.1 if dtype == torch.bfloat16 else 1e-4)
    assert packed.argmax(-1).tolist() == plain.argmax(-1).tolist()
    with torch.no_grad(): m.lm_head.weight.mul_(-1)  # in place: the decode weights and their packed copies are rebuilt
    flipped, plain2 = both()
    assert (flipped - plain2).abs().max().item() < (0.1 if dtype == torch.bfloat16 else 1e-4)
    assert flipped.argmax(-1).tolist() != packed.argmax(-1).tolist()


def test_weights_onednn_cannot_pack_use_plain_products():
    "A float64 model has no packed copy: `decode_batch` multiplies as `decode_step` does, rows still equal"
    m = peaked(ModelConfig.tiny(), seed=4, dtype=torch.float64)
    assert packed_weights(m.decode_weights()) is None
    cache, alone = m.new_cache(2), m.new_cache(1)
    with torch.inference_mode():
        m(torch.tensor([[3, 4]]), cache=alone)
        m(torch.tensor([[3, 4]]), cache=cache.rows(0)); m(torch.tensor([[7, 8]]), cache=cache.rows(1))
        together = m.decode_batch(torch.tensor([6, 2]), torch.tensor([2, 2]), cache)
        assert torch.allclose(together[0], m.decode_step(6, alone, 2), atol=1e-5)


@pytest.mark.parametrize("cfg", [ModelConfig.tiny(), ModelConfig.tiny(n_head=4, n_kv_head=1)])
def test_prompts_prefilled_together_equal_each_prefilled_alone(cfg):
    m = peaked(cfg, seed=7)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (7, 1, 30, 12)]
    big = m.new_cache(5)
    with torch.inference_mode():
        together = m.prefill_rows(prompts, big, first=1)
        for b, p in enumerate(prompts):
            alone = m.new_cache(1)
            logits = m(torch.tensor([p]), cache=alone)[0][0, -1]
            assert (together[b] - logits).abs().max().item() < 1e-4 and int(together[b].argmax()) == int(logits.argmax())
            for layer in range(cfg.n_layer):
                assert torch.allclose(big.v[layer][1 + b, :, :len(p)], alone.v[layer][0, :, :len(p)], atol=1e-5)
    assert big.k[0][0].abs().sum() == 0  # row 0 untouched
    with pytest.raises(ValueError, match="does not fit"): m.prefill_rows([[1] * (cfg.block_size + 1)], big)


def test_decode_batch_refuses_what_does_not_fit():
    m = peaked(ModelConfig.tiny(block_size=16))
    with pytest.raises(ValueError, match="do not fit a cache"): m.decode_batch(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long), m.new_cache(2))
    with pytest.raises(ValueError, match="block_size"): m.decode_batch(torch.ones(1, dtype=torch.long), torch.tensor([16]), m.new_cache(1))


def run(sched, reqs, timeout=60):
    "Submit (prompt, max_new, kwargs) triples at once; each request's emitted tokens, and its end marker"
    outs, ends, left = [[] for _ in reqs], [None] * len(reqs), threading.Semaphore(0)
    def emit_to(i):
        def emit(x):
            if x is None or isinstance(x, Exception): ends[i] = x; left.release()
            else: outs[i].append(x[0])
        return emit
    for i, (p, n, kw) in enumerate(reqs): sched.submit(SeqRequest(p, n, emit_to(i), **kw))
    for _ in reqs: assert left.acquire(timeout=timeout)
    return outs, ends


@pytest.mark.parametrize("max_batch", [1, 3, 16])
def test_the_scheduler_gives_each_request_what_generate_gives_it_alone(max_batch):
    cfg = ModelConfig.tiny(block_size=48, n_head=4, n_kv_head=2)
    m = peaked(cfg, seed=1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in [3, 9, 1, 30, 14, 6, 44, 20]]
    stops = frozenset({7, 11})
    reqs = [(p, n, dict(stop_ids=stops)) for p, n in zip(prompts, [12, 40, 5, 25, 1, 30, 10, 0])]
    alone = [m.generate(p, n, temperature=0, stop_ids=stops) for p, n, _ in reqs]
    sched = BatchScheduler(m, max_batch=max_batch)
    outs, ends = run(sched, reqs)
    # generate drops the stop id it met; the scheduler emits it (as stream_generate does)
    assert [[t for t in o if t not in stops] for o in outs] == [a.ids for a in alone]
    assert all(e is None for e in ends)
    assert [len(o) for o in outs][-1] == 0  # max_new_tokens=0: done at once, nothing made
    assert len(outs[6]) <= cfg.block_size - 44  # a prompt near the context's end stops where generate stops
    st = sched.stats()
    assert st["max_batch_seen"] <= max_batch and st["active"] == st["waiting"] == 0
    if max_batch > 1: assert st["max_batch_seen"] > 1 and st["mean_batch"] > 1
    sched.close()


@pytest.mark.parametrize("max_batch", [4, 9])
def test_beam_searches_in_the_batch_equal_beam_search_alone(max_batch):
    "Beam requests (rows copied every step, moved when others leave) give `beam_search`'s tokens, beside greedy ones"
    cfg = ModelConfig.tiny(block_size=48, n_head=4, n_kv_head=2)
    m = peaked(cfg, seed=1)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in [3, 9, 1, 30, 14, 44]]
    stops = frozenset({7, 11})
    spec = [(4, 20, 2.0), (1, 15, 1.0), (3, 30, 0.0), (2, 25, 1.0), (4, 12, 2.0), (4, 10, 1.0)]  # beams, max_new, penalty
    reqs = [(p, n, dict(stop_ids=stops, beams=b, length_penalty=a)) for p, (b, n, a) in zip(prompts, spec)]
    sched = BatchScheduler(m, max_batch=max_batch)
    outs, ends = run(sched, reqs)
    for p, (b, n, a), o in zip(prompts, spec, outs):
        ref = beam_search(m, p, b, n, a, stops) if b > 1 else m.generate(p, n, temperature=0, stop_ids=stops)
        assert [t for t in o if t not in stops] == ref.ids
        assert (o[-1] in stops) == (ref.finish_reason == "stop") if o else ref.ids == []
    assert all(e is None for e in ends)
    st = sched.stats()
    assert st["max_batch_seen"] <= max_batch and st["active"] == st["waiting"] == 0
    sched.close()


def test_one_beam_without_length_penalty_is_greedy_and_beams_refuse_sampling():
    m = peaked(ModelConfig.tiny(), seed=4)
    g = torch.Generator().manual_seed(1)
    for n in [2, 7, 19]:
        p = torch.randint(0, m.config.vocab_size, (n,), generator=g).tolist()
        one, greedy = beam_search(m, p, 1, 30, 0.0, {7}), m.generate(p, 30, temperature=0, stop_ids={7})
        assert (one.ids, one.finish_reason) == (greedy.ids, greedy.finish_reason)
    sched = BatchScheduler(m, max_batch=4)
    with pytest.raises(ValueError, match="temperature 0"): sched.submit(SeqRequest([1, 2], 5, print, 0.7, beams=2))
    with pytest.raises(ValueError, match="do not fit"): sched.submit(SeqRequest([1, 2], 5, print, 0.0, beams=5))
    with pytest.raises(ValueError, match="at least 1"): sched.submit(SeqRequest([1, 2], 5, print, 0.0, beams=0))
    with pytest.raises(ValueError): get_config(num_beams=9)  # the setting is bounded: 8 rows per answer at most
    sched.close()


def test_seeded_sampling_does_not_depend_on_who_shares_the_batch():
    cfg = ModelConfig.tiny()
    m = peaked(cfg, seed=2)
    p = [5, 17, 42, 99, 7]
    kw = dict(temperature=0.9, top_k=40, top_p=0.95)
    alone = m.generate(p, 20, generator=torch.Generator().manual_seed(7), **kw).ids
    sched = BatchScheduler(m, max_batch=8)
    others = [([1, 2, 3], 20, {}), ([9] * 12, 20, dict(temperature=1.0, generator=torch.Generator().manual_seed(1)))]
    outs, _ = run(sched, [(p, 20, dict(generator=torch.Generator().manual_seed(7), **kw)), *others])
    assert outs[0] == alone
    sched.close()


def test_bad_requests_are_refused_at_submit_and_a_closed_scheduler_refuses_all():
    m = peaked(ModelConfig.tiny(block_size=16))
    sched = BatchScheduler(m)
    for kw, msg in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=msg): sched.submit(SeqRequest([1, 2], 4, lambda x: None, **kw))
    with pytest.raises(ValueError, match="at least one token"): sched.submit(SeqRequest([], 4, lambda x: None))
    with pytest.raises(ValueError, match="does not fit"): sched.submit(SeqRequest(list(range(17)), 4, lambda x: None))
    sched.close()
    with pytest.raises(RuntimeError, match="closed"): sched.submit(SeqRequest([1], 4, lambda x: None))


def test_a_cancelled_request_frees_its_row_and_the_others_finish():
    m = peaked(ModelConfig.tiny(block_size=256), seed=4)
    sched = BatchScheduler(m, max_batch=2)
    first = []
    long = sched.submit(SeqRequest([1, 2, 3], 250, lambda x: first.append(x)))
    while not first: time.sleep(0.01)
    long.cancelled = True
    outs, ends = run(sched, [([4, 5], 10, {}), ([6], 10, {})])  # both need a row: the cancelled one must leave
    assert [len(o) for o in outs] == [10, 10] and ends == [None, None]
    assert long.new < 250 and None not in first  # it never got an end marker: nobody was listening
    sched.close()


def test_an_error_in_a_step_fails_that_batch_and_the_thread_serves_on(monkeypatch):
    m = peaked(ModelConfig.tiny(), seed=5)
    sched = BatchScheduler(m, max_batch=4)
    real, calls = m.decode_batch, []
    def broken(*a, **kw):
        calls.append(1)
        if len(calls) == 1: raise RuntimeError("out of memory (simulated)")
        return real(*a, **kw)
    monkeypatch.setattr(m, "decode_batch", broken)
    outs, ends = run(sched, [([1, 2], 8, {}), ([3, 4, 5], 8, {})])
    assert all(isinstance(e, RuntimeError) for e in ends)
    outs, ends = run(sched, [([1, 2], 8, {}), ([3, 4, 5], 8, {})])
    assert ends == [None, None] and [len(o) for o in outs] == [8, 8]
    sched.close()


def test_closing_fails_what_is_still_running():
    m = peaked(ModelConfig.tiny(block_size=512), seed=6)
    sched = BatchScheduler(m)
    got, ended, first, release = [], threading.Event(), threading.Event(), threading.Event()
    def emit(x):
        if isinstance(x, tuple): first.set(); release.wait(30)  # the first token holds the scheduler until close is asked
        else: got.append(x); ended.set()
    sched.submit(SeqRequest([1], 500, emit))
    assert first.wait(30)
    sched.close(timeout=0)  # asks the thread to stop; it is still inside this request's first token
    release.set()
    assert ended.wait(30) and isinstance(got[0], RuntimeError)
    sched.close()


async def test_the_adapter_answers_sixteen_at_once_as_it_answers_them_one_by_one():
    "The shipped model: sixteen concurrent greedy answers equal the sixteen one after another, decoded in one batch"
    a = CustomAdapter(config=get_config(max_batch=16), fill_placeholders=False)
    await a.load()
    qs = ["How do I activate my card?", "I lost my card", "Why was I charged a fee?", "How long does a transfer take?",
          "my top up failed", "can I change my PIN", "I need to dispute a payment", "where is my statement",
          "is my money safe", "how do I close my account", "what is the exchange rate", "my salary has not arrived",
          "the ATM kept my card", "can I have a virtual card", "how do I update my address", "what's the weather?"]
    one_by_one = [await a.generate(q, max_tokens=40, temperature=0) for q in qs]
    before = a.batch_stats()
    together = await asyncio.gather(*[a.generate(q, max_tokens=40, temperature=0) for q in qs])
    assert [r.text for r in together] == [r.text for r in one_by_one]
    assert [r.confidence for r in together] == pytest.approx([r.confidence for r in one_by_one], abs=1e-4)
    after = a.batch_stats()
    assert after["max_batch_seen"] >= 8 and after["steps"] > before["steps"]
    assert a.admission.concurrency == 16
    a.unload()


async def test_metrics_report_batch_occupancy(tmp_path):
    "The app with the custom model: eight concurrent chats, then /metrics shows the batch's occupancy per model"
    import httpx
    parser = pytest.importorskip("prometheus_client.parser")
    from bankllm.app import create_app
    from bankllm.pipeline import BankingLLMPipeline
    cfg = get_config(max_batch=8, enable_benchmarking=False, benchmark_log=tmp_path/"b.jsonl", fill_placeholders=False)
    a = CustomAdapter(config=cfg)
    pipe = BankingLLMPipeline(cfg, model=a)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(pipe)), base_url="http://t", timeout=120) as c:
        rs = await asyncio.gather(*[c.post("/api/v1/chat", json={"message": f"I lost my card number {i}", "max_tokens": 24})
                                    for i in range(8)])
        assert [r.status_code for r in rs] == [200] * 8
        fams = {f.name: f for f in parser.text_string_to_metric_families((await c.get("/metrics")).text)}
    occ = {s.labels["model"]: s.value for s in fams["bankllm_batch_mean_occupancy"].samples}
    assert occ[a.version] > 1  # answers shared decode steps
    assert {s.labels["model"]: s.value for s in fams["bankllm_batch_active"].samples}[a.version] == 0
    m = pipe.get_metrics()["batching"][a.version]
    assert m["max_batch"] == 8 and 1 < m["max_batch_seen"] <= 8
    a.unload()


async def test_the_custom_threads_setting_sets_the_engine_threads_count():
    a = CustomAdapter(config=get_config(custom_threads=1), fill_placeholders=False)
    r = await a.generate("I lost my card", max_tokens=8, temperature=0)
    assert r.tokens > 0 and a.batch_stats()["threads"] == 1
    a.unload()
    with pytest.raises(ValueError): get_config(custom_threads=0)


def test_beams_go_on_when_every_hypothesis_would_rather_end():
    "Two hypotheses whose best tokens are both stop tokens: both end as candidates, and still `beams` go on"
    from bankllm.beam import BeamSearch, Hyp
    s = BeamSearch(beams=2, length_penalty=1.0, stop_ids={3, 4}, max_new_tokens=10)
    s.live = [Hyp([1], [-0.5], -0.5), Hyp([2], [-0.6], -0.6)]
    lp = torch.tensor([[-5.0, -4.0, -6.0, -0.1, -0.2, -3.0], [-5.0, -6.0, -4.0, -0.15, -0.3, -3.5]])
    src = s.advance(lp)
    assert len(s.live) == 2 and len(src) == 2  # four stop extensions rank first; two hypotheses still go on
    assert all(h.toks[-1] not in (3, 4) for h in s.live) and s.done  # two have ended: early stopping
    assert [h.toks for h in s.ended] == [[1, 3], [1, 4]]  # the best two ended ones are kept


def test_a_guarded_opening_is_written_only_on_greedys_own_path():
    "`greedy_only`: beams that found another opening than greedy's cannot take it; greedy's own opening stays open to them"
    cfg = ModelConfig.tiny(block_size=64, n_head=4, n_kv_head=2)
    m = peaked(cfg, seed=6)
    g = torch.Generator().manual_seed(2)
    stops, found = frozenset({7}), 0
    for _ in range(40):
        p = torch.randint(0, cfg.vocab_size, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        greedy, free = m.generate(p, 20, temperature=0, stop_ids=stops), beam_search(m, p, 4, 20, 1.0, stops)
        if len(free.ids) < 3 or free.ids[:2] == greedy.ids[:2]: continue
        found += 1
        guarded = beam_search(m, p, 4, 20, 1.0, stops, greedy_only=free.ids[:2])
        assert guarded.ids[:2] != free.ids[:2]  # the search's own opening is off greedy's path: not taken
        assert beam_search(m, p, 4, 20, 1.0, stops, greedy_only=greedy.ids[:2]).ids == free.ids  # greedy's: no change
        sched = BatchScheduler(m, max_batch=6)
        outs, _ = run(sched, [(p, 20, dict(stop_ids=stops, beams=4, length_penalty=1.0, greedy_only=tuple(free.ids[:2]))),
                              (p, 20, dict(stop_ids=stops))])
        assert [t for t in outs[0] if t not in stops] == guarded.ids  # the scheduler's rows follow the same rule
        sched.close()
    assert found >= 3  # prompts where beam search and greedy decoding open differently


def test_a_finished_answer_beats_one_cut_at_the_limit():
    "When the search stops, the best ended hypothesis wins even if a live (cut) one ranks higher; live ones only if none ended"
    from bankllm.beam import BeamSearch, Hyp
    s = BeamSearch(beams=2, length_penalty=2.0, stop_ids={3}, max_new_tokens=4)
    s.live, s.ended = [Hyp([0, 1, 1, 1], [-0.1] * 4, -0.4)], [Hyp([2, 3], [-0.3, -0.2], -0.5)]
    assert s.rank(s.live[0]) > s.rank(s.ended[0]) and s.best().toks == [2, 3]
    s.ended = []
    assert s.best().toks == [0, 1, 1, 1]
