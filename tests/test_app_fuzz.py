"""Schema fuzzing: schemathesis generates requests from the app's OpenAPI document, valid ones and deliberately
invalid ones, against an EchoAdapter-backed app (with the admin token, so admin routes are reached too).
Whatever it sends, the app answers without a 5xx. The registry holds only healthy test models here: a request naming
a model that cannot serve (no key, no weights) is rightly a 503, which is about the backend, not about input
handling, and real models would make the run slow. Examples are derandomized, so a failure reproduces."""
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings

from bankllm.testing import EchoAdapter
from bankllm.app import create_app
from bankllm.benchmark import BenchmarkSuite
from bankllm.config import get_config
from bankllm.factory import ModelFactory
from bankllm.pipeline import BankingLLMPipeline

ADMIN = "fuzz-admin-token"
_cfg = get_config(llm_model_version="echo", admin_token=ADMIN, benchmark_interval_requests=50,
                  benchmark_log=Path(tempfile.mkdtemp())/"bench.jsonl")
_pipe = BankingLLMPipeline(_cfg, model=EchoAdapter("echo", _cfg), benchmark_models=["echo"],
                           suite=BenchmarkSuite(n_dev=0, warmup=0, max_tokens=4, prompts=("hi",)))
app = create_app(_pipe)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
SEEN = {"examples": 0, "5xx": 0, "by_status": {}}

@pytest.fixture(autouse=True, scope="module")
def _healthy_registry():
    "Only instant, healthy models are registered while fuzzing"
    saved = dict(ModelFactory.REGISTRY)
    ModelFactory.REGISTRY.clear(); ModelFactory.REGISTRY["echo"] = EchoAdapter
    yield
    ModelFactory.REGISTRY.clear(); ModelFactory.REGISTRY.update(saved)

@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    r = case.call(headers={"Authorization": f"Bearer {ADMIN}"})
    SEEN["examples"] += 1
    SEEN["by_status"][r.status_code] = SEEN["by_status"].get(r.status_code, 0) + 1
    if r.status_code >= 500: SEEN["5xx"] += 1
    assert r.status_code < 500, f"{case.method} {case.path}: {r.status_code} {r.text[:300]}"
    assert "Traceback" not in r.text and ADMIN not in r.text

def test_fuzz_summary():
    print(f"\n[fuzz] {SEEN['examples']} requests, 5xx: {SEEN['5xx']}, by status: {dict(sorted(SEEN['by_status'].items()))}")
    assert SEEN["5xx"] == 0
