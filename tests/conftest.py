"Shared test setup: the data dir, the test-only adapters, a quick benchmark suite, and a fresh factory cache per test."
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_shared = ROOT.parent / "shared" / "data"
if "BANKLLM_DATA_DIR" not in os.environ and _shared.is_dir(): os.environ["BANKLLM_DATA_DIR"] = str(_shared)
# the tests never read a developer's env file or real keys by accident
for k in ("BANKLLM_ENV_FILE", "GEMINI_API_KEY", "GOOGLE_API_KEY"): os.environ.pop(k, None)

from bankllm.testing import EchoAdapter  # noqa: E402
from bankllm.benchmark import BenchmarkSuite  # noqa: E402
from bankllm.factory import ModelFactory  # noqa: E402

TEST_FAMILY = "custom-test"  # a tiny deterministic backend, so the contract suite runs without any model
FAST = BenchmarkSuite(n_dev=0, warmup=0, max_tokens=8)  # benchmark rounds without data or classifier: quick, deterministic

class BrokenEcho(EchoAdapter):
    "Backend down: fails its health check"
    def __init__(self, version=None, config=None): super().__init__(version, config, fail_with=ConnectionError("backend down"))

class NoLoadEcho(EchoAdapter):
    "Healthy until it tries to load its weights"
    def _load(self): raise OSError("weights missing")

@pytest.fixture(autouse=True)
def _factory():
    "Register the test adapter and start every test with an empty instance cache"
    ModelFactory.register(TEST_FAMILY, EchoAdapter)
    ModelFactory.clear_cache()
    yield
    ModelFactory.clear_cache()
    ModelFactory.REGISTRY.pop(TEST_FAMILY, None)
