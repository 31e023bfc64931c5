"Failure paths of the base class, exercised with the echo backend: timeouts, crashes, load failures."
import asyncio

import pytest

from bankllm.adapters.base import AdapterError, AdapterTimeoutError, ModelUnavailableError, RateLimitedError, iterate_in_thread
from bankllm.config import get_config
from bankllm.testing import EchoAdapter


async def test_a_crashing_backend_is_a_502_naming_the_cause_and_is_counted():
    a = EchoAdapter("echo", fail_with=RuntimeError("boom"))
    for call in (lambda: a.generate("hi"), lambda: a.stream("hi").__anext__()):
        with pytest.raises(AdapterError) as e: await call()
        assert e.value.status_code == 502 and "RuntimeError: boom" in str(e.value)
        assert isinstance(e.value.__cause__, RuntimeError)
    m = a.get_metrics()
    assert (m["requests"], m["errors"], m["errors_by_type"]) == (2, 2, {"AdapterError": 2})


async def test_adapter_errors_pass_through_unchanged():
    a = EchoAdapter("echo", fail_with=RateLimitedError("slow down", retry_after=3))
    with pytest.raises(RateLimitedError) as e: await a.generate("hi")
    assert e.value.status_code == 429 and e.value.retry_after == 3


@pytest.mark.parametrize("mode", ["generate", "stream"])
async def test_a_slow_backend_times_out_with_a_504(mode):
    a = EchoAdapter("echo", config=get_config(request_timeout_s=0.05), delay_s=2)
    with pytest.raises(AdapterTimeoutError) as e:
        if mode == "generate": await a.generate("hello there")
        else: [d async for d in a.stream("hello there")]
    assert e.value.status_code == 504 and "0.05s" in str(e.value)
    assert a.get_metrics()["errors"] == 1


async def test_a_failed_load_is_a_503_and_is_retried_next_time(caplog):
    class Flaky(EchoAdapter):
        tries = 0
        def _load(self):
            type(self).tries += 1
            if self.tries == 1: raise OSError("weights not found: model.safetensors")
    a = Flaky("flaky")
    with pytest.raises(ModelUnavailableError) as e: await a.generate("hi")
    assert e.value.status_code == 503 and "failed to load (OSError" in str(e.value)
    assert "weights not found" not in str(e.value)  # a loader's message may quote a file: it goes to the log only
    assert any("weights not found" in r.getMessage() for r in caplog.records)
    assert (await a.generate("hi")).text and a.load_count == 1


async def test_an_unhealthy_backend_gives_the_reason():
    a = EchoAdapter("echo", fail_with=RuntimeError("x"))
    assert await a.health_check() is False and "configured to fail" in a.health_reason


async def test_iterate_in_thread_does_not_block_the_event_loop():
    import time
    def slow():
        for i in range(5): time.sleep(0.05); yield i
    ticks = 0
    async def tick():
        nonlocal ticks
        while True: await asyncio.sleep(0.01); ticks += 1
    t = asyncio.create_task(tick())
    assert [x async for x in iterate_in_thread(slow)] == list(range(5))
    t.cancel()
    assert ticks >= 5  # the loop kept running while the thread worked (not a timing bound on the work)


def test_result_reads_as_the_seed_dict():
    import dataclasses
    from bankllm.adapters.base import GenerationResult
    r = GenerationResult("t", 1.0, 1, 1, 1.0, "stop", None, "v", "cpu")
    assert dict(r)["text"] == "t" and r.to_dict() == dataclasses.asdict(r)
    with pytest.raises(KeyError): r["nope"]
