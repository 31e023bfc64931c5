"""The confidence cascade (`bankllm.cascade`): when it escalates (low confidence, no confidence, the scope hand-off, a
retryable failure) and when it does not (a sure answer, a request at fault); the last stage always answers; the answer
lists the stages tried and costs their sum; streaming buffers the cheap stages; `BANKLLM_CASCADE` fails at start-up when
it is wrong; the replay of recorded answers follows the adapter's rules; the benchmark counts each stage's answers; and
the app with the cascade active over the shipped custom model and an echo backend, under real uvicorn."""
import asyncio

import httpx
import openai
import pandas as pd
import pytest

from bankllm.adapters.base import AdapterError, BadRequestError, ContextWindowError, Generation, ModelUnavailableError
from bankllm.app import create_app
from bankllm.benchmark import BenchmarkSuite, benchmark_model, compare_answers, format_table, results_frame, summarize_rounds
from bankllm.cascade import CascadeAdapter, cascade_outcomes, choose_thresholds, sweep_thresholds
from bankllm.config import get_config
from bankllm.data import SCOPE_ANSWER, bitext_pairs
from bankllm.evaluation import default_classifier
from bankllm.factory import ModelFactory
from bankllm.pipeline import BankingLLMPipeline
from bankllm.training import SHIPPED_VERSION
from bankllm.testing import EchoAdapter
from conftest import FAST
from test_app_live import LiveServer

Q = "How do I activate my new card?"

@pytest.fixture(scope="module")
def judge(): return default_classifier()

@pytest.fixture(scope="module")
def banking_answer(): return bitext_pairs("dev").answer.iloc[0]

class Scripted(EchoAdapter):
    "Answers every question with `text` at `confidence`; `fail_with` raises instead; counts its calls"
    def __init__(self, version, text="Your card is on its way.", confidence=0.9, fail_with=None, config=None):
        super().__init__(version, config)
        self.text, self.conf, self.error, self.calls = text, confidence, fail_with, 0
    async def _generate(self, prompt, max_tokens, temperature, **kw):
        self.calls += 1
        if self.error is not None: raise self.error
        return Generation(self.text, tokens=len(self.text.split()), prompt_tokens=len(prompt.split()), confidence=self.conf)
    async def _stream(self, prompt, max_tokens, temperature, **kw):
        g = await self._generate(prompt, max_tokens, temperature, **kw)
        for i, w in enumerate(g.text.split(" ")): yield w if i == 0 else " " + w
        yield g

def cascade(first, last=None, threshold=0.55, judge=None, config=None):
    return CascadeAdapter("cascade", config, stages=[(first, threshold), (last or EchoAdapter("echo_last"), None)], clf=judge)

def reasons(r): return [s["escalated"] for s in r.cascade["stages"]]

# --- when it escalates, and when it does not -------------------------------------------------------------------

async def test_a_sure_answer_is_accepted_and_the_next_stage_never_asked(judge, banking_answer):
    last = Scripted("dear")
    r = await cascade(Scripted("cheap", banking_answer, 0.9), last, judge=judge).generate(Q, max_tokens=64)
    assert r.cascade["answered_by"] == "cheap" and r.text == banking_answer and reasons(r) == [None]
    assert last.calls == 0 and r.confidence == 0.9

async def test_low_confidence_escalates(judge, banking_answer):
    r = await cascade(Scripted("cheap", banking_answer, 0.3), judge=judge).generate(Q, max_tokens=64)
    assert r.cascade["answered_by"] == "echo_last" and reasons(r) == ["low_confidence", None]
    assert r.cascade["stages"][0]["confidence"] == 0.3 and r.cascade["stages"][0]["threshold"] == 0.55
    assert r.text.startswith("You asked")

async def test_no_confidence_escalates(judge, banking_answer):
    r = await cascade(Scripted("cheap", banking_answer, None), judge=judge).generate(Q, max_tokens=64)
    assert reasons(r) == ["no_confidence", None]

async def test_the_scope_handoff_escalates_even_when_sure(judge):
    r = await cascade(Scripted("cheap", SCOPE_ANSWER, 0.99), judge=judge).generate(Q, max_tokens=64)
    assert r.cascade["answered_by"] == "echo_last" and reasons(r) == ["handoff", None]

async def test_a_handoff_can_be_kept_when_the_setting_says_so(judge):
    c = cascade(Scripted("cheap", SCOPE_ANSWER, 0.99), judge=judge, config=get_config(cascade_handoff=False))
    r = await c.generate(Q, max_tokens=64)
    assert r.cascade["answered_by"] == "cheap" and reasons(r) == [None]

async def test_the_last_stage_always_answers(judge):
    "Unsure, or the hand-off: the last stage's answer stands, whatever it is"
    for last in (Scripted("dear", SCOPE_ANSWER, 0.99), Scripted("dear", "Maybe.", 0.01), Scripted("dear", "Maybe.", None)):
        r = await cascade(Scripted("cheap", "Maybe.", 0.1), last, judge=judge).generate(Q, max_tokens=64)
        assert r.cascade["answered_by"] == "dear" and reasons(r) == ["low_confidence", None] and r.text == last.text

async def test_three_stages_stop_at_the_first_sure_one(judge, banking_answer):
    c = CascadeAdapter("cascade", stages=[(Scripted("a", banking_answer, 0.2), 0.5), (Scripted("b", banking_answer, 0.7), 0.6),
                                          (Scripted("c"), None)], clf=judge)
    r = await c.generate(Q, max_tokens=64)
    assert r.cascade["answered_by"] == "b" and r.cascade["stage"] == 1 and reasons(r) == ["low_confidence", None]
    assert c.get_metrics()["cascade"]["answered"] == {"b": 1} and c.get_metrics()["cascade"]["escalated"] == {"a:low_confidence": 1}

# --- failures: skipped like a fallback, or refused at once --------------------------------------------------------

@pytest.mark.parametrize("error,reason", [(ModelUnavailableError("down"), "unavailable"),
                                          (AdapterError("quota", status_code=429), "rate_limited"),
                                          (ConnectionError("reset"), "error"),
                                          (ContextWindowError("too long"), "context_window")])
async def test_a_retryable_failure_is_skipped_like_a_fallback(judge, error, reason):
    r = await cascade(Scripted("cheap", fail_with=error), judge=judge).generate(Q, max_tokens=16)
    assert r.cascade["answered_by"] == "echo_last" and reasons(r) == [reason, None]
    assert r.cascade["stages"][0]["error"]

async def test_a_request_at_fault_is_not_passed_on(judge):
    last = Scripted("dear")
    c = cascade(Scripted("cheap", fail_with=BadRequestError("the backend refused this request")), last, judge=judge)
    with pytest.raises(BadRequestError): await c.generate(Q, max_tokens=16)
    assert last.calls == 0
    with pytest.raises(BadRequestError): await c.generate("   ", max_tokens=16)  # refused before any stage is asked

async def test_a_failing_stage_cools_down(judge):
    cheap = Scripted("cheap", fail_with=ModelUnavailableError("down"))
    c = cascade(cheap, judge=judge, config=get_config(cooldown_failures=2, cooldown_s=60))
    rs = [await c.generate(Q, max_tokens=8) for _ in range(4)]
    assert [reasons(r)[0] for r in rs] == ["unavailable", "unavailable", "cooling_down", "cooling_down"] and cheap.calls == 2
    assert c.get_metrics()["cascade"]["cooldowns"]["cheap"]["cooling_down_s"] > 50

async def test_when_the_last_stage_fails_the_answer_passed_on_stands(judge):
    r = await cascade(Scripted("cheap", "Maybe.", 0.2), Scripted("dear", fail_with=ModelUnavailableError("down")),
                      judge=judge).generate(Q, max_tokens=8)
    assert r.cascade["answered_by"] == "cheap" and reasons(r) == ["low_confidence", "unavailable"] and r.text == "Maybe."

async def test_every_stage_failing_is_a_clear_error(judge):
    c = cascade(Scripted("cheap", fail_with=ModelUnavailableError("down")), Scripted("dear", fail_with=ModelUnavailableError("down")),
                judge=judge)
    with pytest.raises(AdapterError) as e: await c.generate(Q, max_tokens=8)
    assert "down" in e.value.message and e.value.status_code == 503

# --- cost, latency, streaming ------------------------------------------------------------------------------------

async def test_cost_and_latency_are_sums_over_the_stages_tried(judge):
    price = {"input_per_mtok": 1.0, "output_per_mtok": 4.0}
    cfg = get_config(prices={"cheap": price, "dear": price})
    r = await cascade(Scripted("cheap", "Maybe.", 0.2, config=cfg), Scripted("dear", "Your card is on its way.", 0.9, config=cfg),
                      judge=judge, config=cfg).generate(Q, max_tokens=16)
    costs = [s["cost"] for s in r.cascade["stages"]]
    assert all(c > 0 for c in costs) and r.cost == pytest.approx(sum(costs))
    assert r.latency_ms >= sum(s["latency_ms"] for s in r.cascade["stages"]) - 0.01

async def test_a_stream_abandoned_early_frees_the_last_stages_slot(judge):
    last = Scripted("dear", "Your card is on its way.", 0.9)
    last.admission.concurrency = 1  # one request at a time, as the custom model
    c = cascade(Scripted("cheap", "Maybe.", 0.2), last, judge=judge)
    s = c.stream(Q, max_tokens=16)
    async for _ in s: break
    await s.aclose()  # what the pipeline does when its client goes away
    for _ in range(5): await asyncio.sleep(0)  # the event loop finalizes the inner generators, which close the stage's stream
    assert last.admission.running == 0
    assert (await c.generate(Q, max_tokens=16)).cascade["answered_by"] == "dear"

async def test_a_stream_buffers_the_cheap_stage_and_streams_the_last(judge, banking_answer):
    c = cascade(Scripted("cheap", "Maybe.", 0.2), Scripted("dear", "Your card is on its way.", 0.9), judge=judge)
    deltas = [d async for d in c.stream(Q, max_tokens=16)]
    assert len(deltas) > 1 and "".join(deltas) == "Your card is on its way."  # token by token from the last stage
    assert c.last_stream_result.cascade["answered_by"] == "dear"
    c2 = cascade(Scripted("cheap", banking_answer, 0.9), judge=judge)
    assert [d async for d in c2.stream(Q, max_tokens=16)] == [banking_answer]  # accepted: one piece, after the judge

# --- in the pipeline: fallbacks after the cascade, streaming through it ---------------------------------------------

async def test_the_pipeline_falls_back_when_no_stage_can_answer(tmp_path, judge):
    ModelFactory.register("echo", EchoAdapter)
    try:
        down = ModelUnavailableError("down")
        c = cascade(Scripted("cheap", fail_with=down), Scripted("dear", fail_with=down), judge=judge)
        pipe = BankingLLMPipeline(get_config(fallbacks="echo", benchmark_log=tmp_path/"b.jsonl", enable_benchmarking=False), model=c)
        r = await pipe.generate(Q, max_tokens=16)
        assert r.model_version == "echo" and r.fallbacks[0]["model"] == "cascade" and r.fallbacks[0]["reason"] == "unavailable"
        assert "cheap: unavailable" in r.fallbacks[0]["error"] and r.cascade is None
    finally: ModelFactory.REGISTRY.pop("echo", None)

async def test_the_pipeline_streams_through_the_cascade(tmp_path, judge):
    c = cascade(Scripted("cheap", "Maybe.", 0.2), Scripted("dear", "Call {{Customer Support Phone Number}} today.", 0.9), judge=judge)
    pipe = BankingLLMPipeline(get_config(benchmark_log=tmp_path/"b.jsonl", enable_benchmarking=False), model=c)
    s = pipe.stream(Q, max_tokens=16)
    text = "".join([d async for d in s])
    assert text == "Call +1 555 0100 today." and s.result.cascade["answered_by"] == "dear"  # placeholders filled as for any model
    assert s.result.model_version == "cascade" and pipe.get_metrics()["models"]["cascade"]["requests"] == 1

# --- settings and start-up ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,says", [("custom", "at least two"), ("custom:0.5,qlora:0.5", "give it no threshold"),
                                       ("custom,qlora", "needs a threshold"), ("custom:2,qlora", "from 0 to 1"),
                                       ("custom:x,qlora", "must be a number"), ("custom:0.5,custom", "twice"),
                                       ("custom:0.5,../x", "not a model version"), ("custom:0.5,cascade", "cannot contain a cascade")])
def test_a_bad_cascade_setting_fails_at_startup(monkeypatch, spec, says):
    monkeypatch.setenv("BANKLLM_CASCADE", spec)
    with pytest.raises(ValueError) as e: get_config()
    assert "BANKLLM_CASCADE" in str(e.value) and says in str(e.value)

def test_an_unknown_stage_fails_when_the_pipeline_starts(tmp_path):
    cfg = get_config(llm_model_version="cascade", cascade="nosuch:0.5,custom", benchmark_log=tmp_path/"b.jsonl")
    with pytest.raises(ValueError) as e: BankingLLMPipeline(cfg)
    assert "unknown model 'nosuch'" in str(e.value) and "available families" in str(e.value)

async def test_no_cascade_set_is_a_404_that_says_what_to_set():
    c = ModelFactory.create("cascade")
    assert not await c.health_check() and c.health_status == 404 and "set BANKLLM_CASCADE" in c.health_reason
    with pytest.raises(ModelUnavailableError) as e: await c.generate(Q)
    assert e.value.status_code == 404

def test_the_stages_are_pinned_while_the_cascade_holds_them():
    ModelFactory.register("echo", EchoAdapter)
    try:
        c = ModelFactory.create("cascade", get_config(cascade="custom-test_a:0.5,echo"))
        assert [s.pinned for s in c.stages] == [1, 1] and ModelFactory.create("cascade", get_config(cascade="custom-test_a:0.5,echo")) is c
        c.unload(); c.unload()
        assert [s.pinned for s in c.stages] == [0, 0]  # released once, however often it is unloaded
    finally: ModelFactory.REGISTRY.pop("echo", None)

# --- replaying recorded answers -------------------------------------------------------------------------------------

def _recorded(rows):
    return pd.DataFrame([dict(q=q, set="bitext", model=m, correct=c, handoff=h, confidence=p, cost=k, latency_ms=1.0, error=e)
                         for q, m, c, h, p, k, e in rows])

def test_the_replay_follows_the_adapters_rules():
    rows = [(0, "a", True, False, 0.9, 1.0, None), (0, "b", False, False, 0.9, 5.0, None),   # sure: a answers
            (1, "a", False, False, 0.2, 1.0, None), (1, "b", True, False, 0.9, 5.0, None),   # unsure: b
            (2, "a", False, True, 0.99, 1.0, None), (2, "b", True, True, 0.9, 5.0, None),    # hand-off: b
            (3, "a", False, False, None, 1.0, None), (3, "b", True, False, 0.1, 5.0, None),  # no confidence: b
            (4, "a", True, False, 0.2, 1.0, None), (4, "b", False, False, None, 0.0, "down")]  # b failed: a's answer stands
    out = cascade_outcomes(_recorded(rows), ["a", "b"], [0.55])
    assert out.stage.tolist() == [0, 1, 1, 1, 0] and out.correct.tolist() == [True] * 5
    assert out.cost.tolist() == [1.0, 6.0, 6.0, 6.0, 1.0]
    with pytest.raises(ValueError, match="2 stages take 1 thresholds"): cascade_outcomes(_recorded(rows), ["a", "b"], [0.5, 0.5])

def test_the_sweep_trades_cost_for_quality_and_the_choice_is_the_cheapest_that_reaches_the_target():
    rows = [(0, "a", True, False, 0.9, 1.0, None), (0, "b", True, False, 0.9, 5.0, None),
            (1, "a", False, False, 0.4, 1.0, None), (1, "b", True, False, 0.9, 5.0, None)]
    sw = sweep_thresholds(_recorded(rows), ["a", "b"], grid=[0.0, 0.5, 0.95])
    assert sw.accuracy.tolist() == [0.5, 1.0, 1.0] and sw.cost_per_1k_usd.is_monotonic_increasing
    assert choose_thresholds(sw, 1.0).thresholds == (0.5,) and choose_thresholds(sw, 1.01) is None
    assert sw.share_a.tolist() == [1.0, 0.5, 0.0]

# --- the benchmark and compare_answers see one more model ----------------------------------------------------------

async def test_the_benchmark_row_counts_each_stages_answers(judge, banking_answer):
    c = cascade(Scripted("cheap", banking_answer, 0.9), judge=judge)
    rec = await benchmark_model(c, BenchmarkSuite(n_dev=4, warmup=0, max_tokens=16))
    assert rec["status"] == "ok" and rec["stage_answers"] == {"cheap": rec["n"]}
    s = summarize_rounds([dict(models=[rec]), dict(models=[rec])])["models"]["cascade"]
    assert s["stage_answers"] == {"cheap": 2 * rec["n"]} and s["stage_share"] == {"cheap": 1.0}
    table = format_table(results_frame([rec]))
    assert "cascade answered by: cheap 100%" in table and "$/1k" in table

async def test_compare_answers_shows_the_stage_that_answered(judge):
    qs = BenchmarkSuite(n_dev=3).dev_sample()
    df = await compare_answers([cascade(Scripted("cheap", "Maybe.", 0.1), judge=judge)], qs, max_tokens=16)
    assert (df.answered_by == "echo_last").all() and (df.model == "cascade").all()

# --- the app, the cascade active over the shipped custom model and an echo backend, under real uvicorn ----------------

@pytest.fixture
def cascade_server(tmp_path):
    def start(threshold):
        ModelFactory.register("echo", EchoAdapter)
        cfg = get_config(llm_model_version="cascade", cascade=f"custom:{threshold},echo", benchmark_log=tmp_path/"b.jsonl",
                         enable_benchmarking=False, state_dir=tmp_path/"state")
        return LiveServer(create_app(BankingLLMPipeline(cfg, benchmark_models=["cascade"], suite=FAST)))
    yield start
    ModelFactory.REGISTRY.pop("echo", None)

def test_the_app_serves_the_cascade_over_the_custom_model(cascade_server):
    with cascade_server(1.0) as srv:  # no answer is that sure: every question goes on to the echo backend
        b = httpx.post(f"{srv.url}/api/v1/chat", json={"message": Q, "max_tokens": 24, "temperature": 0}, timeout=120).json()
        assert b["model_version"] == "cascade" and b["cascade"]["answered_by"] == "echo"
        first = b["cascade"]["stages"][0]
        assert first["model"] == SHIPPED_VERSION and first["escalated"] == "low_confidence" and 0 < first["confidence"] < 1
        assert b["response"].startswith("You asked") and b["cost"] == pytest.approx(first["cost"] + b["cascade"]["stages"][1]["cost"])
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = oai.chat.completions.create(model="cascade", messages=[{"role": "user", "content": Q}], max_tokens=24, temperature=0)
        assert r.model == "cascade" and r.model_extra["bankllm"]["cascade"]["answered_by"] == "echo"
        text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
            model="cascade", messages=[{"role": "user", "content": Q}], max_tokens=24, temperature=0, stream=True) if c.choices)
        assert text == r.choices[0].message.content
        models = httpx.get(f"{srv.url}/api/v1/models", timeout=60).json()
        row = next(m for m in models["models"] if m["id"] == "cascade")  # healthy, unless its check outran the health timeout
        assert models["active"] == "cascade" and (row["available"] or "took longer" in (row["reason"] or "")), row

def test_the_app_lets_a_sure_custom_answer_through(cascade_server):
    with cascade_server(0.0) as srv:  # every custom answer is sure enough (unless it is the hand-off)
        b = httpx.post(f"{srv.url}/api/v1/chat", json={"message": Q, "max_tokens": 48, "temperature": 0}, timeout=120).json()
        assert b["cascade"]["answered_by"] == SHIPPED_VERSION and len(b["cascade"]["stages"]) == 1
        assert b["confidence"] == b["cascade"]["stages"][0]["confidence"] and not b["response"].startswith("You asked")
