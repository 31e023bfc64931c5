"""The QLoRA adapter's engines. `transformers`: the shipped adapter on its 4-bit base (also in the contract suite).
`openai`: the official client against a real OpenAI-compatible server on a loopback port — our own app under uvicorn,
serving the same QLoRA model, so the remote answer must equal the local one. `vllm`: see tools/vllm_check.py
(vLLM is not installed in the test environment; its health reason is tested here, and the engine's streaming loop
over vLLM's `LLMEngine` calls against a stand-in for that engine)."""
import asyncio, itertools, math, sys, threading, time
from types import SimpleNamespace

import pytest

from bankllm.adapters.base import BadRequestError, Generation, ModelUnavailableError
from bankllm.adapters.qlora import QLoRAAdapter, VLLMEngine, pick_engine, vllm_installed
from bankllm.app import create_app
from bankllm.config import get_config
from bankllm.pipeline import BankingLLMPipeline
from test_app_live import LiveServer, free_port

Q = "How do I activate my new card?"
VERSION = "qlora_vllm_finetuned_model_v1.0.0"


def test_engine_choice():
    assert pick_engine("auto", has_vllm=True, has_cuda=True) == "vllm"
    assert pick_engine("auto", has_vllm=False, has_cuda=True) == "transformers"
    assert pick_engine("auto", has_vllm=True, has_cuda=False) == "transformers"
    assert pick_engine("auto", "http://gpu-box:8000/v1", has_vllm=True, has_cuda=True) == "openai"
    assert pick_engine("vllm", "http://gpu-box:8000/v1") == "vllm"


@pytest.mark.parametrize("settings, reason", [
    (dict(qlora_engine="openai"), "BANKLLM_QLORA_REMOTE_URL"),
    (dict(qlora_engine="transformers", qlora_adapter="/no/such/adapter"), "no LoRA adapter at"),
    (dict(qlora_engine="transformers", qlora_base="/no/such/base"), "base model '/no/such/base' not found"),
])
async def test_unhealthy_with_the_exact_reason_never_a_crash(settings, reason):
    a = QLoRAAdapter(config=get_config(**settings))  # constructing never fails
    assert await a.health_check() is False and reason in a.health_reason


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here")
async def test_vllm_engine_without_vllm_says_how_to_get_it():
    a = QLoRAAdapter(config=get_config(qlora_engine="vllm"))
    assert await a.health_check() is False and "vLLM is not installed" in a.health_reason


class StepEngine:
    "The part of vLLM's `LLMEngine` that `VLLMEngine` drives: one word per `step()` for every live request"
    def __init__(self, words, delay=0.0):
        self.words, self.delay, self.live, self.aborted, self.prompts, self.batch = words, delay, {}, [], [], []
        self.threads = set()
    def add_request(self, request_id, prompt, params, lora_request=None):
        if params["max_tokens"] < 1: raise ValueError("max_tokens must be at least 1")
        self.threads.add(threading.current_thread().name)
        self.prompts.append(prompt); self.live[request_id] = 0
        return request_id + "-84fba37a"  # as vLLM 0.32: an internal id is returned; outputs and abort use the caller's
    def abort_request(self, ids): self.aborted += ids; [self.live.pop(i, None) for i in ids]
    def step(self):
        self.threads.add(threading.current_thread().name)
        if self.delay: time.sleep(self.delay)  # a real step takes time
        self.batch.append(len(self.live))
        outs = []
        for rid, n in list(self.live.items()):
            n = self.live[rid] = n + 1
            done = n == len(self.words)
            if done: del self.live[rid]
            o = SimpleNamespace(text="".join(self.words[:n]), token_ids=list(range(n)), finish_reason="stop" if done else None,
                                logprobs=[{i: SimpleNamespace(logprob=-0.1)} for i in range(n)])
            outs.append(SimpleNamespace(request_id=rid, finished=done, prompt_token_ids=[7, 8, 9], outputs=[o]))
        return outs

WORDS = ["Your ", "card ", "is ", "on ", "its ", "way."]

@pytest.fixture
def step_engine(monkeypatch):
    "A `VLLMEngine` over `StepEngine` (vLLM itself is not installed here)"
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=lambda **kw: kw))
    e = VLLMEngine.__new__(VLLMEngine)
    e.llm = SimpleNamespace(llm_engine=StepEngine(WORDS))
    e.tok = SimpleNamespace(apply_chat_template=lambda *a, **kw: {"input_ids": [7, 8, 9]})
    e.lora, e.device, e.ids, e.inbox, e.cv, e.driver = None, "cpu", itertools.count(), [], threading.Condition(), None
    return e

async def answer(engine, max_tokens=16):
    return [d async for d in engine.stream("Where is my card?", None, max_tokens, 0.0)]

async def test_vllm_engine_streams_every_step(step_engine):
    *deltas, final = await answer(step_engine)
    assert deltas == WORDS and isinstance(final, Generation)
    assert (final.tokens, final.prompt_tokens, final.finish_reason) == (6, 3, "stop")
    assert final.confidence == pytest.approx(math.exp(-0.1))
    eng = step_engine.llm.llm_engine
    assert eng.prompts == [{"prompt_token_ids": [7, 8, 9]}]  # the chat template's ids
    assert eng.threads == {"vllm-driver"}  # one thread touches the engine

async def test_vllm_engine_batches_concurrent_answers(step_engine):
    step_engine.llm.llm_engine.delay = 0.05  # long enough for all four to join the first steps
    answers = await asyncio.gather(*[answer(step_engine) for _ in range(4)])
    assert all(a[:-1] == WORDS for a in answers)
    assert max(step_engine.llm.llm_engine.batch) == 4  # one step advanced all four

async def test_vllm_engine_aborts_a_request_whose_client_left(step_engine):
    eng = step_engine.llm.llm_engine
    eng.delay = 0.2  # the client leaves during the second step
    s = step_engine.stream("Where is my card?", None, 16, 0.0)
    assert await anext(s) == "Your "
    await s.aclose()
    for _ in range(100):  # the driver takes the abort after the step in progress
        if eng.aborted: break
        await asyncio.sleep(0.05)
    assert eng.aborted == ["bankllm-0"] and not eng.live
    assert (await answer(step_engine))[-1].tokens == 6  # the engine still serves

async def test_vllm_engine_survives_an_abort_that_fails(step_engine, caplog):
    eng = step_engine.llm.llm_engine
    eng.delay = 0.2
    def broken(ids): raise RuntimeError("engine core went away")
    eng.abort_request = broken
    s = step_engine.stream("Where is my card?", None, 16, 0.0)
    await anext(s); await s.aclose()
    for _ in range(100):
        if "could not abort" in caplog.text: break
        await asyncio.sleep(0.05)
    assert "could not abort request bankllm-0: RuntimeError" in caplog.text
    eng.delay = 0.0
    assert (await answer(step_engine))[-1].tokens == 6  # the driver thread lives on

async def test_vllm_engine_refusal_is_a_bad_request(step_engine):
    with pytest.raises(BadRequestError, match="vLLM refused the request"): await answer(step_engine, max_tokens=0)
    assert (await answer(step_engine))[-1].tokens == 6

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "Our app under uvicorn, serving the shipped QLoRA adapter (transformers engine) as an OpenAI-compatible server"
    tmp = tmp_path_factory.mktemp("qlora_server")
    cfg = get_config(qlora_engine="transformers", llm_model_version=VERSION, benchmark_log=tmp/"b.jsonl",
                     enable_benchmarking=False)
    local = QLoRAAdapter(VERSION, cfg)
    with LiveServer(create_app(BankingLLMPipeline(cfg, model=local, benchmark_models=[]))) as srv:
        srv.local = local
        yield srv


def remote(url, **kw):
    return QLoRAAdapter(config=get_config(qlora_engine="auto", qlora_remote_url=url, qlora_remote_model=VERSION, **kw))


async def test_openai_engine_answers_like_the_local_model(served):
    r = remote(f"{served.url}/v1")
    assert r.engine == "openai" and r.device == "remote"
    assert await r.health_check(), r.health_reason
    got = await r.generate(Q, max_tokens=40, temperature=0)
    want = await served.local.generate(Q, max_tokens=40, temperature=0)
    assert got.text == want.text and got.tokens == want.tokens and got.finish_reason == want.finish_reason
    deltas = [d async for d in r.stream(Q, max_tokens=40, temperature=0)]
    assert len(deltas) > 1 and "".join(deltas) == want.text


async def test_openai_engine_names_a_missing_lora_module(served):
    r = QLoRAAdapter(config=get_config(qlora_remote_url=f"{served.url}/v1", qlora_remote_model="no-such-lora"))
    assert await r.health_check() is False and "not 'no-such-lora'" in r.health_reason


async def test_openai_engine_server_down_is_503_and_never_shows_the_key():
    key = "sk-test-9f8e7d6c5b4a"
    r = remote(f"http://127.0.0.1:{free_port()}/v1", qlora_api_key=key)
    assert await r.health_check() is False and "unreachable" in r.health_reason
    with pytest.raises(ModelUnavailableError) as e: await r.generate(Q, max_tokens=5)
    assert e.value.status_code == 503
    for text in (str(e.value), repr(e.value), r.health_reason, repr(r), str(r.get_metrics())):
        assert key not in text
