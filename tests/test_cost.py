"""What answers cost: known answers for token-priced and time-priced models, the `BANKLLM_PRICES` setting,
cost on every answer, in `/v1` usage and `/api/v1/chat`, and per model in `/metrics`."""
import httpx
import pytest

from bankllm.adapters.base import Generation
from bankllm.config import DEFAULT_PRICES, Price, get_config
from bankllm.testing import EchoAdapter
from test_app import USER, make_app

TOKENS = Price(input_per_mtok=2.0, output_per_mtok=10.0)

def test_token_price_bills_thinking_as_output():
    assert TOKENS.cost(prompt_tokens=1_000_000) == pytest.approx(2.0)
    assert TOKENS.cost(prompt_tokens=500, tokens=100, thinking_tokens=400) == pytest.approx((500*2 + 500*10)/1e6)
    assert TOKENS.cost(None, None, None, None) == 0.0

def test_time_price_from_measured_latency():
    assert Price(per_hour=3.6).cost(tokens=999, latency_ms=2_000) == pytest.approx(0.002)  # 2 s of a $3.60 hour
    assert DEFAULT_PRICES["custom"].per_hour > 0 and DEFAULT_PRICES["qlora"].per_hour > 0

def test_lookup_order(monkeypatch):
    monkeypatch.setenv("BANKLLM_PRICES", '{"gemini_3.5_flash_v9": {"input_per_mtok": 1}, "gemini": {"output_per_mtok": 7}}')
    cfg = get_config()
    assert cfg.price_for("gemini_3.5_flash_v9", "gemini-3.5-flash", "gemini") == Price(input_per_mtok=1)  # version first
    assert cfg.price_for("gemini_x", "gemini-3.5-flash", "gemini") == DEFAULT_PRICES["gemini-3.5-flash"]  # then model
    assert cfg.price_for("gemini_x", "gemini-9", "gemini") == Price(output_per_mtok=7)                    # then family
    assert cfg.price_for("nothing") == Price()

@pytest.mark.parametrize("bad", ['{"custom": {"per_hour": -0.5}}', '{"custom": {"per_hour": "cheap"}}',
                                 '{"custom": {"per_hour": "nan"}}', '{"custom": {"per_token": 1}}', '{"custom": 3}', '[1]', 'not json'])
def test_bad_prices_fail_naming_the_setting(monkeypatch, bad):
    monkeypatch.setenv("BANKLLM_PRICES", bad)
    with pytest.raises(Exception, match="prices|PRICES"): get_config()

class Thinker(EchoAdapter):
    "Reports fixed counts, thinking included"
    async def _generate(self, prompt, max_tokens, temperature, **kw):
        return Generation("ok", tokens=100, prompt_tokens=1000, thinking_tokens=300)

async def test_cost_on_every_answer_generate_and_stream():
    cfg = get_config(prices={"think-1": TOKENS.model_dump()})
    a = Thinker("think-1", cfg)
    r = await a.generate("hi")
    assert r.cost == pytest.approx((1000*2 + 400*10)/1e6) and r["cost"] == r.cost
    e = EchoAdapter("echo-1", get_config(prices={"echo": {"per_hour": 3600.0}}))  # $1 a second: cost == latency in s
    async for _ in e.stream("hi there"): pass
    s = e.last_stream_result
    assert s.cost == pytest.approx(s.latency_ms/1000) and s.cost > 0
    assert a.get_metrics()["cost_usd"] == pytest.approx(r.cost)

@pytest.fixture
async def priced(tmp_path):
    app, pipe = make_app(tmp_path, prices={"custom-test": TOKENS.model_dump()})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        c.pipe = pipe
        yield c

async def test_usage_chat_and_metrics_carry_cost(priced):
    r = (await priced.post("/v1/chat/completions", json={"model": "custom-test", "messages": USER, "max_tokens": 5})).json()
    u = r["usage"]
    assert u["cost_usd"] == pytest.approx((u["prompt_tokens"]*2 + u["completion_tokens"]*10)/1e6) and u["cost_usd"] > 0
    b = (await priced.post("/api/v1/chat", json={"message": "What are the ATM fees?", "max_tokens": 5})).json()
    assert b["cost"] > 0
    parser = pytest.importorskip("prometheus_client.parser")
    m = await priced.get("/metrics")
    fams = {f.name: f for f in parser.text_string_to_metric_families(m.text)}
    assert fams["bankllm_cost_usd"].type == "counter"
    (s,) = [s for s in fams["bankllm_cost_usd"].samples if s.name == "bankllm_cost_usd_total"]
    assert s.labels == {"model": "custom-test"} and s.value == pytest.approx(u["cost_usd"] + b["cost"])
    assert priced.pipe.get_metrics()["models"]["custom-test"]["cost_usd"] == pytest.approx(s.value)

async def test_client_cannot_set_prices(priced):
    for body in [{"model": "custom-test", "messages": USER, "prices": {"custom-test": {"input_per_mtok": 0}}},
                 {"model": "custom-test", "messages": USER, "cost_usd": 0}]:
        r = await priced.post("/v1/chat/completions", json=body)
        assert r.status_code in (200, 400, 422)
        if r.status_code == 200: assert r.json()["usage"]["cost_usd"] > 0
    assert priced.pipe.config.price_for("custom-test") == TOKENS

async def test_benchmark_cost_per_round_and_per_1k():
    import matplotlib; matplotlib.use("Agg")
    import pandas as pd
    from bankllm.benchmark import BenchmarkSuite, benchmark_model, plot_quality_cost, summarize_rounds
    cfg = get_config(prices={"echo": {"per_hour": 3600.0}})  # $1 a second: cost == seconds answering
    rec = await benchmark_model(EchoAdapter("echo_cost", cfg), BenchmarkSuite(n_dev=0, warmup=0))
    assert rec["cost_round_usd"] == pytest.approx(sum(rec["latencies_ms"])/1000, rel=1e-2)
    assert rec["cost_per_1k_usd"] == pytest.approx(1000*rec["cost_round_usd"]/rec["n"])
    s = summarize_rounds([dict(models=[rec]), dict(models=[rec])])["models"]["echo_cost"]
    assert s["cost_usd"] == pytest.approx(2*rec["cost_round_usd"]) and s["cost_per_round_usd"] == pytest.approx(rec["cost_round_usd"])
    df = pd.DataFrame([{**rec, "topic_accuracy": 0.5}, {**rec, "model_version": "free", "cost_per_1k_usd": 0.0, "topic_accuracy": 0.9}])
    fig = plot_quality_cost(df)
    assert len(fig.axes[0].collections[0].get_offsets()) == 2


def test_a_copy_with_new_prices_or_bank_name_recomputes_what_derives_from_them():
    "`price_table` and `placeholders` are cached per Settings; `model_copy(update=...)` must not carry the old ones"
    cfg = get_config(prices={"custom": {"per_hour": 0.5}}, bank_name="Old Bank")
    assert cfg.price_for("custom").per_hour == 0.5 and cfg.placeholders["Bank Name"] == "Old Bank"  # both cached now
    new = cfg.model_copy(update=dict(prices={"custom": Price(per_hour=2.0)}, bank_name="New Bank"))
    assert new.price_for("custom").per_hour == 2.0 and new.placeholders["Bank Name"] == "New Bank"
    assert cfg.price_for("custom").per_hour == 0.5  # the original keeps its own
