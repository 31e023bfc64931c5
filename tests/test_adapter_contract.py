"""The adapter contract: every registered model family must pass these tests.

Parametrized over the factory's registry (plus the test-only echo backend). A family whose adapter is not built
yet, or that cannot serve here (no key, no GPU), is skipped with the reason, so the suite grows as adapters land.
Backends that need a test environment (a fake server, a tiny local model) provide it through `ADAPTER_BUILDERS`.
"""
import asyncio
import math

import pytest

from bankllm.adapters.base import BadRequestError, GenerationResult, ModelAdapter, ModelUnavailableError
from bankllm.factory import ModelFactory
from conftest import TEST_FAMILY

# family -> callable returning an adapter wired to its test environment; default: `ModelFactory.create(family)`
ADAPTER_BUILDERS: dict = {}


def _gemini(family):
    "The real google-genai SDK against the fake Gemini server (tests/fake_gemini.py), with a fake key"
    from fake_gemini import shared_server
    from bankllm.config import get_config
    from bankllm.factory import DEFAULT_VERSIONS
    fake = shared_server().reset()
    return ModelFactory.create(DEFAULT_VERSIONS[family], get_config(gemini_api_key="fake-contract-key", gemini_base_url=fake.url))

ADAPTER_BUILDERS["gemini"] = _gemini


def _cascade(family):
    "A cascade of two test backends: the first one's answers are sure enough (echo confidence ~0.8) unless they are long"
    from bankllm.config import get_config
    return ModelFactory.create(family, get_config(cascade=f"{TEST_FAMILY}_a:0.5,{TEST_FAMILY}_b"))

ADAPTER_BUILDERS["cascade"] = _cascade

FAMILIES = sorted({*ModelFactory.REGISTRY, TEST_FAMILY})
PROMPT = "I still have not received my new card, what should I do?"
RESULT_KEYS = {"text", "latency_ms", "tokens", "prompt_tokens", "ttft_ms", "finish_reason", "confidence",
               "model_version", "device", "thinking_tokens", "turns_dropped", "cost", "cascade"}


@pytest.fixture(params=FAMILIES)
async def adapter(request) -> ModelAdapter:
    family = request.param
    try: a = ADAPTER_BUILDERS.get(family, ModelFactory.create)(family)
    except ModelUnavailableError as e: pytest.skip(f"{family}: {e}")
    if not await a.health_check(): pytest.skip(f"{family} cannot serve here: {a.health_reason}")
    return a


async def test_generate_returns_the_result_contract(adapter):
    r = await adapter.generate(PROMPT, max_tokens=32, temperature=0)
    assert isinstance(r, GenerationResult) and set(r) == RESULT_KEYS
    assert isinstance(r.text, str) and r.text.strip()
    assert r.latency_ms > 0 and r.ttft_ms is not None and 0 <= r.ttft_ms <= r.latency_ms
    assert r.finish_reason in {"stop", "length"}
    assert r.tokens is None or 0 < r.tokens <= 32
    assert r.confidence is None or 0 < r.confidence <= 1
    assert isinstance(r.cost, float) and r.cost >= 0  # USD at the price in the settings (0 for a test backend)
    assert r.model_version == adapter.version and isinstance(r.device, str)
    assert r.thinking_tokens is None or r.thinking_tokens >= 0
    assert r["text"] == r.text  # the seed's dict access still works


async def test_greedy_is_deterministic(adapter):
    a, b = [await adapter.generate(PROMPT, max_tokens=24, temperature=0) for _ in range(2)]
    assert a.text == b.text


async def test_stream_yields_the_greedy_answer(adapter):
    whole = await adapter.generate(PROMPT, max_tokens=24, temperature=0)
    deltas = [d async for d in adapter.stream(PROMPT, max_tokens=24, temperature=0)]
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == whole.text


async def test_max_tokens_bounds_the_answer(adapter):
    r = await adapter.generate(PROMPT, max_tokens=3, temperature=0)
    assert r.tokens is None or r.tokens <= 3
    assert r.finish_reason in {"stop", "length"}


BAD = [dict(prompt=""), dict(prompt="   "), dict(prompt=None), dict(max_tokens=0), dict(max_tokens=-5),
       dict(max_tokens=10**9), dict(max_tokens="5"), dict(max_tokens=2.5), dict(temperature=-0.1),
       dict(temperature=2.5), dict(temperature="hot")]

@pytest.mark.parametrize("bad", BAD, ids=[next(iter(b.items())).__repr__() for b in BAD])
async def test_bad_input_is_a_400_that_says_what_is_wrong(adapter, bad):
    before = adapter.get_metrics()["requests"]
    with pytest.raises(BadRequestError) as e: await adapter.generate(**{"prompt": PROMPT, **bad})
    assert e.value.status_code == 400 and next(iter(bad)) in str(e.value)
    with pytest.raises(BadRequestError): [d async for d in adapter.stream(**{"prompt": PROMPT, **bad})]
    assert adapter.get_metrics()["requests"] == before  # rejected before any model work


async def test_metrics_count_requests_with_ordered_percentiles(adapter):
    for _ in range(3): await adapter.generate(PROMPT, max_tokens=8, temperature=0)
    _ = [d async for d in adapter.stream(PROMPT, max_tokens=8, temperature=0)]
    m = adapter.get_metrics()
    assert m["requests"] == 4 and m["errors"] == 0 and m["samples"] == 4
    assert 0 < m["latency_p50_ms"] <= m["latency_p95_ms"] <= m["latency_p99_ms"]
    assert m["tokens_per_s"] is None or m["tokens_per_s"] > 0
    assert isinstance(m["device"], str)
    assert m["memory_mb"] is None or (isinstance(m["memory_mb"], float) and math.isfinite(m["memory_mb"]))


async def test_health_is_a_bool_with_a_reason_only_when_unhealthy(adapter):
    ok = await adapter.health_check()
    assert ok is True and adapter.health_reason is None


async def test_concurrent_requests_all_complete(adapter):
    rs = await asyncio.gather(*[adapter.generate(f"{PROMPT} ({i})", max_tokens=8, temperature=0) for i in range(8)])
    assert len(rs) == 8 and all(r.text for r in rs)
    assert adapter.get_metrics()["requests"] == 8


async def test_a_stream_abandoned_early_leaves_the_adapter_usable(adapter):
    async for _ in adapter.stream(PROMPT, max_tokens=24, temperature=0): break
    r = await adapter.generate(PROMPT, max_tokens=8, temperature=0)
    assert r.text


async def test_load_happens_once_under_concurrency(adapter):
    await asyncio.gather(*[adapter.load() for _ in range(20)])
    assert adapter.loaded and adapter.load_count == 1
