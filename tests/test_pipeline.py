"BankingLLMPipeline: numbering, background rounds, the log, switching, statuses, summary, loops. No wall-clock gating."
import asyncio, json

import pytest

from bankllm.adapters.base import Generation
from bankllm.benchmark import BenchmarkSuite
from bankllm.records import read_jsonl
from bankllm.testing import EchoAdapter
from bankllm.config import get_config
from bankllm.factory import ModelFactory
from bankllm.pipeline import BankingLLMPipeline, PipelineResult, PipelineStream
from conftest import FAST, BrokenEcho, NoLoadEcho


class FlakyEcho(EchoAdapter):
    "Healthy, but every other request fails"
    calls = 0
    async def _generate(self, prompt, max_tokens, temperature, **kw):
        type(self).calls += 1
        if type(self).calls % 2 == 0: raise RuntimeError("connection reset")
        return Generation("ok", tokens=1)

class GatedEcho(EchoAdapter):
    "Answers only once the test opens the gate: a benchmark round that lasts exactly as long as the test wants"
    gate: asyncio.Event|None = None
    async def _generate(self, prompt, max_tokens, temperature, **kw):
        await type(self).gate.wait()
        return Generation("gated answer", tokens=2)

class TemplateEcho(EchoAdapter):
    "Answers with a Bitext-style template, streamed in pieces that split the placeholder"
    async def _stream(self, prompt, max_tokens, temperature, **kw):
        for d in ["Call {", "{Customer Support ", "Phone Number}} or visit {{Bank", " Name}} today."]: yield d

class AskingEcho(EchoAdapter):
    "Answers with a sentence that asks for the card number, streamed in pieces that split it"
    async def _stream(self, prompt, max_tokens, temperature, **kw):
        for d in ["I can help. Please provide ", "me with your {{Card", " Number}}. Then call ", "{{Customer Support Phone Number}}."]:
            yield d

@pytest.fixture
def families():
    names = {"broken": BrokenEcho, "noload": NoLoadEcho, "flaky": FlakyEcho, "gated": GatedEcho, "template": TemplateEcho,
             "asking": AskingEcho}
    for k, v in names.items(): ModelFactory.register(k, v)
    GatedEcho.gate = asyncio.Event()
    yield names
    for k in names: ModelFactory.REGISTRY.pop(k, None)

def cfg(tmp_path, **kw):
    return get_config(**{"llm_model_version": "custom-test", "benchmark_interval_requests": 10,
                         "benchmark_log": tmp_path/"bench.jsonl", **kw})

def log_lines(tmp_path):
    "Every line of the log, each parsed strictly (a broken line fails the test)"
    text = (tmp_path/"bench.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(l) for l in text.splitlines()]

def trigger_numbers(lines):
    return sorted(x for l in lines for x in [l["triggered_by"], *l["coalesced"]] if isinstance(x, int))

# --- numbering and triggers --------------------------------------------------------------------------------------
async def test_200_concurrent_numbers_and_triggers(tmp_path, families):
    p = await BankingLLMPipeline.create(cfg(tmp_path, max_queue=256), benchmark_models=["custom-test"], suite=FAST)
    rs = await asyncio.gather(*[p.generate(f"question {i}", max_tokens=5) for i in range(200)])
    await p.drain()
    assert sorted(r.request_number for r in rs) == list(range(1, 201))
    lines = log_lines(tmp_path)
    runs, coalesced = len(lines), sum(len(l["coalesced"]) for l in lines)
    assert runs >= 1 and runs + coalesced == 20 == p.triggers == sum(l["triggers"] for l in lines)
    assert trigger_numbers(lines) == list(range(10, 201, 10))
    assert p.triggers_coalesced == coalesced and p.rounds_run == runs

async def test_rounds_one_at_a_time_and_coalesced_triggers_counted(tmp_path, families):
    "Two bursts, each while a gated round runs: two rounds, the other triggers coalesced into them"
    p = BankingLLMPipeline(cfg(tmp_path, max_queue=256), benchmark_models=["gated"], suite=FAST)
    for burst in range(2):
        await asyncio.gather(*[p.generate("q", max_tokens=5) for _ in range(100)])
        assert p._round is not None and len(p._tasks) == 1       # one round in flight, the rest coalesced
        GatedEcho.gate.set(); await p.drain(); GatedEcho.gate.clear()
    lines = log_lines(tmp_path)
    assert [(l["triggered_by"], len(l["coalesced"])) for l in lines] == [(10, 9), (110, 9)]
    assert trigger_numbers(lines) == list(range(10, 201, 10))
    assert all(m["status"] == "ok" for l in lines for m in l["models"])

async def test_triggering_request_does_not_wait_for_the_round(tmp_path, families):
    "The round cannot finish until the gate opens, and the gate opens only after the triggering request returned"
    p = BankingLLMPipeline(cfg(tmp_path, benchmark_interval_requests=3), benchmark_models=["gated"], suite=FAST)
    for _ in range(2): await p.generate("q")
    r = await asyncio.wait_for(p.generate("the trigger"), timeout=30)   # a hang would fail here, not pass slowly
    assert r.request_number == 3 and p._round is not None and not p._round.task.done()
    GatedEcho.gate.set()
    rec = await p.run_benchmark_round()                                # joins the round in flight
    assert rec["triggered_by"] == 3 and rec["coalesced"] == ["manual"]
    assert r.latency_ms < rec["duration_ms"]

async def test_benchmarking_disabled(tmp_path):
    p = BankingLLMPipeline(cfg(tmp_path, enable_benchmarking=False), suite=FAST)
    await asyncio.gather(*[p.generate("q") for _ in range(30)])
    await p.drain()
    assert p.triggers == 0 and not (tmp_path/"bench.jsonl").exists()

# --- statuses and summary ----------------------------------------------------------------------------------------
async def test_round_statuses(tmp_path, families):
    p = BankingLLMPipeline(cfg(tmp_path), benchmark_models=["custom-test", "broken", "noload", "flaky", "nosuch_1.0.0"],
                           suite=FAST)
    rec = await p.run_benchmark_round()
    st = {m["model_version"]: (m["status"], m["reason"]) for m in rec["models"]}
    assert st["custom-test"] == ("ok", None)
    assert st["broken"][0] == "unavailable" and "backend down" in st["broken"][1]
    assert st["noload"][0] == "unavailable" and "failed to load (OSError" in st["noload"][1]
    assert st["flaky"][0] == "error" and "connection reset" in st["flaky"][1]
    assert st["nosuch_1.0.0"][0] == "unavailable" and "available families" in st["nosuch_1.0.0"][1]
    assert log_lines(tmp_path)[0]["round_id"] == rec["round_id"]

async def test_default_round_covers_every_registered_family(tmp_path, families, monkeypatch):
    "Without `benchmark_models` a round covers the registry, the active model standing in for its family"
    monkeypatch.setattr(ModelFactory, "REGISTRY", {"custom-test": EchoAdapter, "broken": BrokenEcho,
                                                    "gemini": "bankllm.adapters.nosuch:Nothing"})
    p = BankingLLMPipeline(cfg(tmp_path), suite=FAST)
    rec = await p.run_benchmark_round()
    st = {m["model_version"]: m["status"] for m in rec["models"]}
    assert st == {"custom-test": "ok", "broken": "unavailable", "gemini_3.5_flash_v1.0.0": "unavailable"}

async def test_summary(tmp_path, families):
    p = BankingLLMPipeline(cfg(tmp_path), benchmark_models=["custom-test", "template", "broken"],
                           suite=BenchmarkSuite(n_dev=3, warmup=0, max_tokens=16))
    for _ in range(2): await p.run_benchmark_round()
    s = p.get_benchmark_summary()
    assert s["rounds"] == 2 and s["benchmarking"]["triggers"] == 2
    m = s["models"]["custom-test"]
    assert m["n"] == 12 and m["rounds"] == 2 and m["tail_label"] == "max" and m["latency_p99_ms"] is None
    assert m["quality_n"] == 6 and m["topic_accuracy"] is not None and m["rouge_l"] is not None
    assert s["models"]["broken"]["status"] == "unavailable" and s["models"]["broken"]["n"] == 0
    assert s["recommendation"]["fastest_model"] in ("custom-test", "template")
    assert p.get_benchmark_summary(from_log=True)["models"]["custom-test"]["n"] == 12

# --- switching ---------------------------------------------------------------------------------------------------
async def test_switch_rollback_keeps_old_model_with_reason(tmp_path, families):
    p = await BankingLLMPipeline.create(cfg(tmp_path, enable_benchmarking=False))
    for target, code, words in [("broken", 409, "backend down"), ("noload", 409, "failed to load (OSError"),
                                ("nosuch_1.0.0", 404, "available families")]:
        r = await p.switch_model(target)
        assert (r.ok, r.status_code, r.active, p.active_version) == (False, code, "custom-test", "custom-test")
        assert words in r.reason
    assert (await p.generate("still here?")).model_version == "custom-test"
    ok = await p.switch_model("template")
    assert ok.ok and ok.previous == "custom-test" and p.active_version == "template"

async def test_requests_in_flight_during_a_switch_complete(tmp_path, families):
    ModelFactory.register("slow", type("SlowEcho", (EchoAdapter,), {"__init__": lambda s, v=None, c=None: EchoAdapter.__init__(s, v, c, delay_s=0.05)}))
    p = await BankingLLMPipeline.create(cfg(tmp_path, llm_model_version="slow", enable_benchmarking=False))
    inflight = [asyncio.create_task(p.generate(f"q{i}")) for i in range(20)]
    await asyncio.sleep(0)                                  # all 20 have started on the old model
    assert (await p.switch_model("custom-test")).ok
    after = await p.generate("after the switch")
    done = await asyncio.gather(*inflight)
    assert all(r.model_version == "slow" for r in done) and after.model_version == "custom-test"
    assert sorted(r.request_number for r in done + [after]) == list(range(1, 22))
    ModelFactory.REGISTRY.pop("slow")

# --- placeholders, conversation ids, streaming, metrics ----------------------------------------------------------
async def test_placeholders_and_conversation_ids(tmp_path, families):
    c = cfg(tmp_path, llm_model_version="template", enable_benchmarking=False, bank_name="Acme Bank")
    p = BankingLLMPipeline(c)
    r = await p.generate("how do I call you?", conversation_id="conv-1")
    assert isinstance(r, PipelineResult) and r["conversation_id"] == "conv-1" and r.pipeline_version
    assert "{{" not in r.text and "Acme Bank" in r.text and c.placeholders["Customer Support Phone Number"] in r.text
    a, b = await p.generate("q"), await p.generate("q")
    assert a.conversation_id and a.conversation_id != b.conversation_id
    raw = await BankingLLMPipeline(c, fill_placeholders=False).generate("q")
    assert "{{Bank Name}}" in raw.text

async def test_stream_numbered_filled_and_counted(tmp_path, families):
    p = BankingLLMPipeline(cfg(tmp_path, llm_model_version="template", enable_benchmarking=False))
    g = await p.generate("q")
    s = p.stream("q", conversation_id="c9")
    assert isinstance(s, PipelineStream) and s.request_number == 2 and s.conversation_id == "c9"
    deltas = [d async for d in s]
    assert "".join(deltas) == g.text and len(deltas) > 1 and "{{" not in "".join(deltas)
    assert s.result.request_number == 2 and s.result.text == g.text and s.result.ttft_ms is not None
    assert p.get_metrics()["models"]["template"]["requests"] == 2

async def test_no_credential_ask_reaches_the_customer(tmp_path, families):
    p = BankingLLMPipeline(cfg(tmp_path, llm_model_version="asking", enable_benchmarking=False))
    g = await p.generate("q")
    streamed = "".join([d async for d in p.stream("q")])
    assert streamed == g.text and "provide" not in g.text and "Card Number" not in g.text
    assert g.text.startswith("I can help. Please ") and g.text.endswith(get_config().placeholders["Customer Support Phone Number"] + ".")

async def test_metrics_count_errors_per_model(tmp_path, families):
    p = BankingLLMPipeline(cfg(tmp_path, enable_benchmarking=False))
    await p.generate("q", max_tokens=5)
    with pytest.raises(Exception): await p.generate("")     # a bad request: counted, numbered, re-raised
    m = p.get_metrics()
    t = m["models"]["custom-test"]
    assert (m["requests_total"], t["requests"], t["errors"], t["errors_by_type"]) == (2, 2, 1, {"BadRequestError": 1})
    assert t["latency_buckets"][max(t["latency_buckets"])] == t["latency_count"] == 1 and m["in_flight"] == 0

# --- event loops ------------------------------------------------------------------------------------------------
async def test_works_inside_a_running_loop(tmp_path, monkeypatch):
    "create, create_sync and generate all work with a loop running, and the library never calls asyncio.run"
    def no_run(*a, **kw): raise AssertionError("asyncio.run called by library code")
    monkeypatch.setattr(asyncio, "run", no_run)
    a = await BankingLLMPipeline.create(cfg(tmp_path))
    b = BankingLLMPipeline.create_sync(cfg(tmp_path))
    assert a.model.loaded and b.model.loaded
    assert (await b.generate("q")).request_number == 1

def test_create_sync_without_a_loop(tmp_path):
    p = BankingLLMPipeline.create_sync(cfg(tmp_path))
    assert p.model.loaded and p.request_count == 0

async def test_create_fails_with_reason_for_unhealthy_model(tmp_path, families):
    with pytest.raises(Exception, match="backend down"):
        await BankingLLMPipeline.create(cfg(tmp_path, llm_model_version="broken"))

async def test_async_context_manager_drains(tmp_path, families):
    async with BankingLLMPipeline(cfg(tmp_path, benchmark_interval_requests=1), benchmark_models=["custom-test"], suite=FAST) as p:
        await p.generate("q")
    assert not p._tasks and len(read_jsonl(tmp_path/"bench.jsonl")) == 1
