"""The app under a real uvicorn server on a loopback port, driven by real clients: the official `openai` client
(plain and streaming), httpx, a load test (500 requests at concurrency 32), and the shipped custom model once.
Timings are printed (`pytest -s`), never asserted."""
import asyncio, time

import httpx
import openai
import pytest

from bankllm.records import percentile
from bankllm.testing import EchoAdapter, LiveServer, free_port  # noqa: F401 (other tests import them from here)
from bankllm.app import create_app
from bankllm.benchmark import BenchmarkSuite
from bankllm.config import get_config
from bankllm.pipeline import BankingLLMPipeline

ADMIN = "live-admin-token-5e8a"

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    cfg = get_config(llm_model_version="echo", benchmark_log=tmp/"bench.jsonl", admin_token=ADMIN, state_dir=tmp/"state",
                     benchmark_interval_requests=100)
    pipe = BankingLLMPipeline(cfg, model=EchoAdapter("echo", cfg), benchmark_models=["echo"],
                              suite=BenchmarkSuite(n_dev=0, warmup=0, max_tokens=8))
    with LiveServer(create_app(pipe)) as srv:
        srv.pipe = pipe
        yield srv

@pytest.fixture
def oai(live): return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)

def test_openai_client_plain(oai):
    r = oai.chat.completions.create(model="echo", messages=[{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "What are the ATM fees?"}],
                                    max_tokens=32, temperature=0)
    print(f"\n[openai plain] model={r.model} finish={r.choices[0].finish_reason} usage={r.usage.model_dump()}\n"
          f"  {r.choices[0].message.content!r}")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "You asked: What are the ATM fees? A banking assistant would answer that here."
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-")

def test_openai_client_stream(oai):
    stream = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "I lost my card"}],
                                         max_tokens=6, stream=True, stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage: usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content: deltas.append(c.delta.content)
            finish = c.finish_reason or finish
    print(f"\n[openai stream] {len(deltas)} deltas {deltas} finish={finish} usage={usage.model_dump()}")
    assert "".join(deltas) == "You asked: I lost my card"
    assert finish == "length" and usage.completion_tokens == 6

def test_openai_client_models_and_errors(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == "echo" and "custom_model_built_0.0.0" in ids
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-nonexistent", messages=[{"role": "user", "content": "hi"}])
    assert "unknown model" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    assert "max_tokens" in e.value.message
    print(f"\n[openai errors] 404: {e.value.status_code and 'unknown model'} / 400: {e.value.message}")

def test_httpx_routes(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/ready").status_code == 200
        r = c.post("/api/v1/chat", json={"message": "hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["text"] == "You asked: hello"
        assert c.post("/api/v1/chat", content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
        assert c.post("/api/v1/benchmark/run", headers={"Authorization": f"Bearer {ADMIN}"}).json()["status"] == "ok"
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
            lines = [l for l in s.iter_lines() if l]
        assert lines[-1] == "data: [DONE]"
        assert "bankllm_requests_total" in c.get("/metrics").text

async def test_load_500_requests_concurrency_32(live):
    n, conc = 500, 32
    sem, lat, out = asyncio.Semaphore(conc), [], []
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=live.url, limits=limits, timeout=60) as c:
        async def one(i):
            async with sem:
                t0 = time.perf_counter()
                if i % 2: r = await c.post("/api/v1/chat", json={"message": f"question {i}", "max_tokens": 8})
                else: r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8})
                lat.append((time.perf_counter() - t0) * 1000)
                out.append(r)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    errors = [r for r in out if r.status_code != 200]
    numbers = [r.json()["request_number"] if "request_number" in r.json() else r.json()["bankllm"]["request_number"]
               for r in out if r.status_code == 200]
    print(f"\n[load] {n} requests, concurrency {conc}: {n/wall:.0f} req/s, p50 {percentile(lat, 50):.1f} ms, "
          f"p99 {percentile(lat, 99):.1f} ms, max {max(lat):.1f} ms, errors {len(errors)}, wall {wall:.2f}s")
    assert not errors, errors[:3]
    assert len(set(numbers)) == n  # every request got its own number
    await asyncio.to_thread(lambda: None)
    # the background benchmark rounds the load triggered all completed
    for _ in range(200):
        if not live.pipe._tasks: break
        await asyncio.sleep(0.05)

def test_shipped_custom_model_live(tmp_path):
    "The real from-scratch model behind the real server, through the openai client (small max_tokens)"
    cfg = get_config(llm_model_version="custom_model_built_0.0.0", benchmark_log=tmp_path/"bench.jsonl",
                     enable_benchmarking=False)
    with LiveServer(create_app(config=cfg)) as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="custom", messages=[{"role": "user", "content": "How do I activate my new card?"}],
                                      max_tokens=24, temperature=0)
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="custom_model_built_0.0.0", messages=[{"role": "user", "content": "What are the ATM fees?"}],
            max_tokens=16, temperature=0, stream=True) if ch.choices)
        ready = httpx.get(f"{srv.url}/ready").json()
    print(f"\n[custom live] {r.model}: {r.choices[0].message.content!r} usage={r.usage.model_dump()}\n  stream: {text!r}")
    assert r.model == "custom_model_built_0.0.0" and r.usage.completion_tokens <= 24 and r.choices[0].message.content
    assert text and ready["status"] == "ready"


def test_a_client_that_disconnects_mid_stream_stops_the_generation(tmp_path):
    "The shipped model streams over SSE; the client hangs up after the first delta: the server stops generating and serves on"
    from bankllm.adapters.custom import CustomAdapter
    cfg = get_config(llm_model_version="custom_model_built_0.0.0", benchmark_log=tmp_path/"bench.jsonl",
                     enable_benchmarking=False, fill_placeholders=False)
    a = CustomAdapter(config=cfg)
    body = dict(model="custom", messages=[{"role": "user", "content": "How do I close my savings account?"}],
                max_tokens=200, temperature=0, stream=True)
    with LiveServer(create_app(BankingLLMPipeline(cfg, model=a))) as srv:
        full = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "stream": False}, timeout=120).json()
        assert full["usage"]["completion_tokens"] > 40
        before = a.scheduler.tokens
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line: break  # the first delta, then hang up
        for _ in range(600):  # the scheduler frees the row at its next step
            if a.batch_stats()["active"] == 0: break
            time.sleep(0.05)
        made = range(a.scheduler.tokens - before)
        after = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 8}, timeout=120)
    print(f"\n[disconnect] {len(made)} tokens generated after the client left at the first of {full['usage']['completion_tokens']}")
    assert len(made) < full["usage"]["completion_tokens"] // 2 and after.status_code == 200
