"The factory: names, errors, lazy registry, caching under concurrency, and a light import."
import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bankllm.adapters.base import ModelUnavailableError
from bankllm.testing import EchoAdapter
from bankllm.config import get_config
from bankllm.factory import DEFAULT_VERSIONS, ModelFactory, UnknownModelError, parse_version

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_name_lists_what_exists():
    with pytest.raises(ValueError) as e: ModelFactory.create("nope")
    msg = str(e.value)
    assert "'nope'" in msg and all(f in msg for f in ("custom", "gemini", "qlora"))


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_or_non_string_names_are_rejected(bad):
    with pytest.raises(ValueError): ModelFactory.create(bad)


def test_the_three_families_are_registered_from_the_start():
    assert {"custom", "qlora", "gemini"} <= set(ModelFactory.REGISTRY)
    assert set(DEFAULT_VERSIONS) == {"custom", "qlora", "gemini"}


def test_a_missing_module_says_not_built_yet():
    ModelFactory.register("later", "bankllm.adapters.later:LaterAdapter")
    try:
        with pytest.raises(ModelUnavailableError, match="registered but not built yet"): ModelFactory.create("later")
    finally: ModelFactory.REGISTRY.pop("later")


def test_version_strings_pass_the_rest_to_the_adapter():
    a = ModelFactory.create("custom-test_tiny_v2.1.0")
    assert a.version == "custom-test_tiny_v2.1.0" and isinstance(a, EchoAdapter)
    v = parse_version(a.version)
    assert (v.family, v.variant, v.semver) == ("custom-test", "tiny", "2.1.0")


def test_register_rejects_underscores_and_replaces_cached_instances():
    with pytest.raises(ValueError, match="cannot contain '_'"): ModelFactory.register("my_model", EchoAdapter)
    first = ModelFactory.create("custom-test")
    class Other(EchoAdapter): pass
    ModelFactory.register("custom-test", Other)
    assert isinstance(ModelFactory.create("custom-test"), Other) and ModelFactory.create("custom-test") is not first


async def test_fifty_concurrent_creates_give_one_instance_and_one_load():
    class Slow(EchoAdapter):
        built = 0
        def __init__(self, *a, **kw):
            time.sleep(0.02)  # a slow constructor widens the race window
            super().__init__(*a, **kw); type(self).built += 1
        def _load(self): time.sleep(0.05)
    ModelFactory.register("custom-test", Slow)
    async def one():
        m = await asyncio.to_thread(ModelFactory.create, "custom-test")
        return await m.load()
    with ThreadPoolExecutor(8) as ex:
        threaded = ex.map(lambda _: ModelFactory.create("custom-test"), range(16))
        models = await asyncio.gather(*[one() for _ in range(50)])
        models += list(threaded)
    assert len({id(m) for m in models}) == 1
    assert Slow.built == 1 and models[0].load_count == 1


def test_active_model_follows_the_setting():
    m = ModelFactory.get_active_model(get_config(llm_model_version="custom-test"))
    assert m is ModelFactory.create("custom-test")


@pytest.mark.parametrize("env", sorted(p.name for p in ROOT.glob(".env.*")))
def test_shipped_env_files_name_registered_families(env):
    cfg = get_config(ROOT / env)
    assert parse_version(cfg.llm_model_version).family in ModelFactory.REGISTRY
    assert env.removeprefix(".env.") == parse_version(cfg.llm_model_version).family


def test_importing_the_package_and_factory_stays_light():
    heavy = ("torch", "google.genai", "peft", "transformers", "vllm", "bitsandbytes", "matplotlib")
    code = ("import sys, bankllm, bankllm.factory, bankllm.config, bankllm.adapters.base; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cascade_is_offered_only_when_configured():
    "Model lists, benchmark rounds and the names clients may use include the cascade only when BANKLLM_CASCADE names stages"
    plain, with_cascade = get_config(), get_config(cascade="custom:0.6,qlora")
    assert "cascade" not in ModelFactory.offered(plain) and "cascade" not in ModelFactory.default_versions(plain)
    assert "cascade" not in ModelFactory.known_versions(plain)
    assert "cascade" in ModelFactory.offered(with_cascade) and "cascade" in ModelFactory.known_versions(with_cascade)
    with pytest.raises(UnknownModelError, match="set BANKLLM_CASCADE"): ModelFactory.create("cascade", plain, known_only=True)
