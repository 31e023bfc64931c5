"""Security regression tests: each attack of `tools/security_probe.py`, run against the app under a real uvicorn
server on a loopback port (in a thread of this process), small enough to be quick and deterministic.

Covered: model names are names, never paths (traversal, a folder in the working directory, no existence oracle, a
planted config.json never echoed, QLoRA traversal, the `models` allowlist, the admin switch); the bounded model
cache (LRU eviction, bounded /metrics, RSS under a flood of name variants with the shipped model active); admission
control (429 + Retry-After at once beyond running + max_queue); cancellation of abandoned requests; the admin token on
`/api/v1/benchmark/summary?from_log=true`; secrets and card numbers masked in every log record (uvicorn's access log
included) and the `mask_sensitive` table; odd inputs (invisible text, a chunked body over 1 MB); hung health checks
(504, failed switches recorded). Timings are printed (`pytest -s`); only orderings and generous bounds are asserted."""
import asyncio, json, logging, os, shutil, sqlite3, time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

import bankllm.adapters.custom as custom_mod
import bankllm.adapters.qlora as qlora_mod
from bankllm.adapters.base import Generation, process_rss_mb
from bankllm.app import create_app, mask_sensitive
from bankllm.config import get_config
from bankllm.factory import ModelFactory
from bankllm.pipeline import BankingLLMPipeline
from bankllm.testing import EchoAdapter
from bankllm.training import checkpoints_dir
from conftest import FAST
from test_app_live import LiveServer

ADMIN = "sec-admin-token-9d41c7"
CUSTOM = "custom_model_built_0.0.0"
SHIPPED = checkpoints_dir()/CUSTOM

def oa(model=None, content="hi", max_tokens=4)->dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return body | ({"model": model} if model is not None else {})

def err(r)->dict: return r.json()["error"]

def make_cfg(tmp_path, **kw):
    return get_config(**{"llm_model_version": "custom-test", "benchmark_log": tmp_path/"bench.jsonl", "admin_token": ADMIN,
                         "enable_benchmarking": False, "gemini_api_key": None, "state_dir": tmp_path/"state", **kw})

@contextmanager
def serve(tmp_path, model=None, server_cls=LiveServer, **kw):
    "The app around an EchoAdapter (or `model`) under real uvicorn; `srv.pipe` is its pipeline"
    cfg = make_cfg(tmp_path, **kw)
    model = model(cfg) if callable(model) else model or EchoAdapter(cfg.llm_model_version, cfg)
    pipe = BankingLLMPipeline(cfg, model=model, benchmark_models=[model.version], suite=FAST)
    with server_cls(create_app(pipe)) as srv:
        srv.pipe = pipe
        yield srv

def plant(where:Path, config_extra:dict|None=None)->Path:
    "A copy of the shipped checkpoint at `where` (optionally with extra keys in its config.json)"
    where.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SHIPPED, where)
    if config_extra:
        cfg = json.loads((where/"config.json").read_text())
        (where/"config.json").write_text(json.dumps({**config_extra, **cfg}))
    return where

@pytest.fixture
def lookups(monkeypatch):
    "Every name the custom and QLoRA adapters try to find on disk"
    seen = []
    for mod in (custom_mod, qlora_mod):
        real = mod.find_artifact
        def spy(name, *a, _real=real, **kw): seen.append(name); return _real(name, *a, **kw)
        monkeypatch.setattr(mod, "find_artifact", spy)
    return seen

class OneAtATime(EchoAdapter):
    "One request at a time; each takes `delay_s` unless its prompt starts with 'quick'"
    max_concurrency = 1
    async def _stream(self, prompt, max_tokens, temperature, **kw):
        if not prompt.startswith("quick"): await asyncio.sleep(self.delay_s)
        yield Generation(f"You asked: {prompt}", tokens=1, prompt_tokens=1)

class HungHealth(EchoAdapter):
    "A backend whose health check never answers"
    async def _health(self): await asyncio.sleep(3600)

def poll(cond, timeout=5.0, every=0.02)->bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond(): return True
        time.sleep(every)
    return cond()

# --- model names are names, never paths --------------------------------------------------------------------------

def _traversal(target:Path)->str:
    "`custom_model_built_0.0.0/` and enough `../` to climb from the shipped checkpoint to / , then `target`"
    ups = len(Path(os.path.realpath(SHIPPED)).parts) - 1
    return f"{CUSTOM}/" + "../"*ups + str(Path(os.path.realpath(target))).lstrip("/")

NAMES = {  # id -> model name built from the planted folder
    "dotdot to planted": _traversal,
    "dotdot to /etc/passwd": lambda p: f"{CUSTOM}/../../../../../../../../etc/passwd",
    "absolute path": lambda p: str(p),
    "family + absolute path": lambda p: f"custom_{p}",
    "backslashes": lambda p: f"{CUSTOM}\\..\\..\\x",
    "dotdot inside a name": lambda p: "custom_..x",
}

@pytest.mark.parametrize("make", NAMES.values(), ids=NAMES.keys())
def test_path_in_model_name_is_404(tmp_path, lookups, make):
    planted = plant(tmp_path/"planted"/"x")
    name = make(planted)
    assert len(name) <= 200, name  # a longer one would be a 400 before the name is even looked at
    with serve(tmp_path) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=oa(name), timeout=30)
    assert r.status_code == 404, r.text
    assert err(r)["code"] == "model_not_found" and err(r)["type"] == "not_found_error"
    assert name not in lookups  # refused before the name went near the file system
    assert not any(isinstance(a, custom_mod.CustomAdapter) for a in ModelFactory.loaded())

def test_folder_in_working_directory_is_not_served(tmp_path, monkeypatch, lookups):
    plant(tmp_path/"custom_cwd"); monkeypatch.chdir(tmp_path)
    with serve(tmp_path) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=oa("custom_cwd"), timeout=30)
    assert r.status_code == 404 and err(r)["code"] == "model_not_found", r.text
    assert CUSTOM in err(r)["message"]  # it lists what is served
    assert "custom_cwd" not in lookups and not ModelFactory.loaded()

def test_no_existence_oracle(tmp_path, monkeypatch):
    "A planted folder and a missing one get the same status and the same body, up to the name and request id"
    plant(tmp_path/"custom_cwd2"); monkeypatch.chdir(tmp_path)
    with serve(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        have = c.post("/v1/chat/completions", json=oa("custom_cwd2"))
        miss = c.post("/v1/chat/completions", json=oa("custom_nosuchfolder"))
    assert have.status_code == miss.status_code == 404
    def shape(r, name):
        e = dict(err(r), request_id=None)
        return dict(e, message=e["message"].replace(name, "NAME"))
    assert shape(have, "custom_cwd2") == shape(miss, "custom_nosuchfolder")
    assert set(have.headers) - {"date"} == set(miss.headers) - {"date"}

def test_planted_config_never_echoed(tmp_path, monkeypatch):
    "A config.json with an unknown key: in the cwd (not served), and in a configured checkpoint folder (fails to load)"
    extra = {"secret_key_from_file": "PLANTED-VALUE-77"}
    plant(tmp_path/"custom_evil", extra); plant(tmp_path/"ck"/"custom_evil2", extra); monkeypatch.chdir(tmp_path)
    with serve(tmp_path, checkpoint_dirs=[tmp_path/"ck"]) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        rs = {"cwd": c.post("/v1/chat/completions", json=oa("custom_evil")),
              "dirs": c.post("/v1/chat/completions", json=oa("custom_evil2")),
              "switch": c.post("/api/v1/model/switch/custom_evil2", headers={"Authorization": f"Bearer {ADMIN}"})}
        rs |= {p: c.get(p) for p in ("/api/v1/models", "/v1/models", "/metrics", "/ready", "/api/v1/benchmark/summary")}
    print("\n[planted config] " + ", ".join(f"{k}: {r.status_code}" for k, r in rs.items()))
    assert rs["cwd"].status_code == 404 and rs["dirs"].status_code == 503 and rs["switch"].status_code == 409
    for k, r in rs.items():
        assert "secret_key_from_file" not in r.text and "PLANTED-VALUE" not in r.text, (k, r.text)

def test_qlora_traversal_is_404_without_the_path(tmp_path, lookups):
    name = "qlora_" + "../"*8 + "etc"
    with serve(tmp_path) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=oa(name), timeout=30)
    print(f"\n[qlora traversal] {r.status_code} {r.text[:300]}")
    assert r.status_code == 404 and err(r)["code"] == "model_not_found", r.text
    assert name not in lookups
    assert "/etc" not in r.text, r.text

def test_allowlisted_version_is_served(tmp_path):
    with serve(tmp_path, models=["custom-test_extra_1.0.0"]) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        ok = c.post("/v1/chat/completions", json=oa("custom-test_extra_1.0.0"))
        other = c.post("/v1/chat/completions", json=oa("custom-test_other_1.0.0"))
    assert ok.status_code == 200 and ok.json()["model"] == "custom-test_extra_1.0.0", ok.text
    assert other.status_code == 404 and "custom-test_extra_1.0.0" in err(other)["message"]

def test_admin_switch_follows_the_same_rule(tmp_path, monkeypatch, lookups):
    plant(tmp_path/"custom_cwd"); monkeypatch.chdir(tmp_path)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with serve(tmp_path, models=["custom-test_extra_1.0.0"]) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        cwd = c.post("/api/v1/model/switch/custom_cwd", headers=auth)
        dots = c.post("/api/v1/model/switch/custom_..%2F..%2Fetc", headers=auth)
        active = srv.pipe.active_version
        ok = c.post("/api/v1/model/switch/custom-test_extra_1.0.0", headers=auth)
    assert cwd.status_code == 404 and cwd.json()["active"] == "custom-test" and err(cwd)["message"], cwd.text
    assert dots.status_code == 404 and active == "custom-test"
    assert "custom_cwd" not in lookups
    assert ok.status_code == 200 and srv.pipe.active_version == "custom-test_extra_1.0.0", ok.text
    assert [s["status_code"] for s in srv.pipe.switches][-1] == 200 and srv.pipe.switches[0]["ok"] is False

# --- a bounded model cache ---------------------------------------------------------------------------------------

def test_model_cache_is_bounded_and_metrics_do_not_grow_with_unknown_names(tmp_path):
    names = [f"custom-test_m{i}" for i in range(20)]
    ev0 = ModelFactory.evictions
    with serve(tmp_path, models=names, max_models=3) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        codes = [c.post("/v1/chat/completions", json=oa(n)).status_code for n in names]
        loaded = [a.version for a in ModelFactory.loaded()]
        assert c.post("/v1/chat/completions", json=oa("custom-test_unknown_0")).status_code == 404
        lines0 = c.get("/metrics").text.count("\n")
        unknown = [c.post("/v1/chat/completions", json=oa(f"custom-test_unknown_{i}")).status_code for i in range(1, 51)]
        lines1 = c.get("/metrics").text.count("\n")
    print(f"\n[cache] loaded {loaded}, evictions +{ModelFactory.evictions - ev0}, /metrics {lines0} -> {lines1} lines")
    assert codes == [200]*20 and unknown == [404]*50
    assert len(loaded) <= 3 and ModelFactory.evictions - ev0 >= 17
    assert lines1 == lines0

def test_rss_bounded_under_name_variants_with_the_shipped_model(tmp_path):
    "100 `custom_model_built_0.0.0///…` and 140 `gemini_i` names (all 404) cost the server < 150 MiB; bounded to ~20 s"
    names = [CUSTOM + "/"*k for k in range(1, 101)] + [f"gemini_{i}" for i in range(140)]
    deadline = time.monotonic() + 20
    with serve(tmp_path, model=lambda cfg: custom_mod.CustomAdapter(CUSTOM, config=cfg), llm_model_version=CUSTOM,
               models=[CUSTOM]) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        warm = c.post("/v1/chat/completions", json=oa(CUSTOM, max_tokens=2))
        assert warm.status_code == 200, warm.text
        rss0, codes = process_rss_mb(), []
        for n in names:
            if time.monotonic() > deadline: break
            codes.append(c.post("/v1/chat/completions", json=oa(n, max_tokens=2)).status_code)
        rss1 = process_rss_mb()
    print(f"\n[rss] {len(codes)} requests: RSS {rss0:.1f} -> {rss1:.1f} MiB (+{rss1 - rss0:.1f})")
    assert len(codes) == len(names), "ran out of its 20 s"
    assert set(codes) == {404}
    assert rss1 - rss0 < 150
    assert not ModelFactory.loaded()  # none of the names made an adapter

# --- admission control --------------------------------------------------------------------------------------------

async def test_flood_is_shed_with_429_beyond_the_queue(tmp_path):
    with serve(tmp_path, model=lambda cfg: OneAtATime("custom-test_flood", cfg, delay_s=1.0), max_queue=4) as srv:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as c:
            t0 = time.perf_counter()
            async def one(i):
                r = await c.post("/api/v1/chat", json={"message": f"question {i}", "max_tokens": 4})
                return r, time.perf_counter() - t0
            res = await asyncio.gather(*(one(i) for i in range(32)))
        # a fresh connection: the shed requests' idle keep-alive connections are ~5 s old by now, uvicorn's
        # keep-alive timeout, and reusing one as the server closes it is a disconnect race, not a finding
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            metrics = (await c.get("/metrics")).text
    shed = [(r, t) for r, t in res if r.status_code == 429]
    done = [(r, t) for r, t in res if r.status_code == 200]
    print(f"\n[flood] {len(done)} x 200 (first at {min(t for _, t in done):.2f} s), {len(shed)} x 429 "
          f"(slowest at {max(t for _, t in shed):.3f} s), Retry-After {sorted({r.headers['retry-after'] for r, _ in shed})}")
    assert len(shed) == 27 and len(done) == 5
    assert max(t for _, t in shed) < min(t for _, t in done)  # refused at once, not after waiting
    for r, _ in shed:
        e = err(r)
        assert int(r.headers["retry-after"]) >= 1
        assert e["type"] == "rate_limit_error" and e["code"] == "OverloadedError" and e["message"]
    assert 'bankllm_requests_shed_total{model="custom-test_flood"} 27.0' in metrics.splitlines()

async def test_the_custom_model_batches_at_most_max_batch_and_sheds_beyond_the_queue(tmp_path):
    "The real from-scratch model: 2 rows decoded together, 2 waiting; the rest of a flood of 12 long answers is shed (429)"
    from bankllm.adapters.custom import CustomAdapter
    with serve(tmp_path, model=lambda cfg: CustomAdapter(config=cfg, fill_placeholders=False), max_batch=2, max_queue=2) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/api/v1/chat", json={"message": f"I lost my card ({i})", "max_tokens": 300})
                                        for i in range(12)))
            seen = srv.pipe.get_metrics()["batching"]
    codes = [r.status_code for r in rs]
    assert set(codes) == {200, 429} and codes.count(200) >= 4 and codes.count(429) >= 6, codes  # 4 + 8 when all arrive at once
    assert all(r.headers["retry-after"] for r in rs if r.status_code == 429)
    (b,) = seen.values()
    assert b["max_batch"] == 2 and b["max_batch_seen"] <= 2 and b["active"] == 0


# --- cancellation -----------------------------------------------------------------------------------------------------

async def test_abandoned_requests_stop_their_generation(tmp_path):
    with serve(tmp_path, model=lambda cfg: OneAtATime("custom-test_slow", cfg, delay_s=2.0)) as srv:
        async def abandon(i):
            async with httpx.AsyncClient(base_url=srv.url, timeout=0.2) as c:
                with pytest.raises(httpx.TimeoutException):
                    await c.post("/v1/chat/completions", json=oa(content=f"long question {i}"))
        await asyncio.gather(*(abandon(i) for i in range(4)))  # 4 x 2 s of work if nobody noticed they left
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", json=oa(content="quick one"))
            quick = time.perf_counter() - t0
            adm = srv.pipe.model.admission
            idle = await asyncio.to_thread(poll, lambda: adm.running == 0 and adm.waiting == 0, 3)
            gone = await asyncio.to_thread(poll, lambda: srv.pipe.in_flight == 0, 3)
            metrics = (await c.get("/metrics")).text
    print(f"\n[abandoned] quick request after 4 abandoned: {quick:.2f} s; admission {adm.stats()}")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You asked: quick one"
    assert quick < 4.0  # the abandoned ones would have held the only slot for 8 s
    assert idle and gone, adm.stats()
    assert 'bankllm_http_responses_total{code="499"} 4.0' in metrics.splitlines()

# --- the benchmark log is an admin's read -------------------------------------------------------------------------

@pytest.mark.parametrize("token", [ADMIN, None], ids=["admin token set", "no admin token"])
def test_summary_from_log_needs_the_admin_token(tmp_path, token):
    with serve(tmp_path, admin_token=token) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        url, q = "/api/v1/benchmark/summary", {"from_log": "true"}
        plain = c.get(url)
        anon = c.get(url, params=q)
        wrong = c.get(url, params=q, headers={"Authorization": "Bearer not-the-token"})
        right = c.get(url, params=q, headers={"Authorization": f"Bearer {ADMIN}"})
    assert plain.status_code == 200
    if token is None: assert anon.status_code == wrong.status_code == right.status_code == 403
    else: assert (anon.status_code, wrong.status_code, right.status_code) == (401, 401, 200), right.text
    for r in (anon, wrong, right): assert "not-the-token" not in r.text and ADMIN not in r.text

# --- logs ---------------------------------------------------------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self): super().__init__(logging.DEBUG); self.lines = []; self.setFormatter(logging.Formatter("%(name)s %(message)s"))
    def emit(self, record): self.lines.append(self.format(record))

class LoggingServer(LiveServer):
    "LiveServer with uvicorn's access log on, at level info, and a handler collecting every formatted record"
    def __init__(self, app):
        super().__init__(app)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="info",
                                                    lifespan="on", access_log=True))  # sets up uvicorn's loggers
        self.collect = _Collect()
        self.targets = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "")]
        for lg in self.targets: lg.addHandler(self.collect)
    def __exit__(self, *exc):
        try: super().__exit__(*exc)
        finally:
            for lg in self.targets: lg.removeHandler(self.collect)

SECRETS = ("SUPERSECRET", "4111.1111", "4111111111111111", "4111 1111", "west1234", ADMIN)

def test_no_secret_or_card_in_any_log_record(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bankllm")
    card_msg = "my card 4111.1111.1111.1111 and card4111111111111111 and gb82west12345698765432"
    long_msg = "x"*290 + " 4111 1111 1111 1111"  # masking first: a cut at 300 chars would leave '4111 1111'
    with serve(tmp_path, server_cls=LoggingServer) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        h = c.get("/health", params={"token": "SUPERSECRET123", "api_key": "SUPERSECRET456"})
        a = c.post("/api/v1/chat", json={"message": card_msg, "max_tokens": 4})
        b = c.post("/v1/chat/completions", json=oa(content=long_msg))
        w = c.post("/api/v1/benchmark/run?password=SUPERSECRET789", headers={"Authorization": f"Bearer {ADMIN}"})
        lines = srv.collect.lines
        poll(lambda: sum("uvicorn.access" in l for l in lines) >= 4, 3)
        lines = list(lines)
    print("\n[log] " + "\n[log] ".join(l[:160] for l in lines))
    assert (h.status_code, a.status_code, b.status_code, w.status_code) == (200, 200, 200, 200)
    assert any("uvicorn.access" in l and "token=[secret]" in l and "api_key=[secret]" in l for l in lines)
    assert any("bankllm.app" in l and "[card ****1111]" in l and "[iban GB**]" in l for l in lines)
    for l in lines + [r.getMessage() for r in caplog.records]:
        for s in SECRETS: assert s not in l, (s, l)

MASK = [  # (id, text, masked)
    ("dots", "card 4111.1111.1111.1111 ok", "card [card ****1111] ok"),
    ("dashes", "4111-1111-1111-1111", "[card ****1111]"),
    ("nbsp", "4111\u00a01111\u00a01111\u00a01111", "[card ****1111]"),
    ("narrow nbsp", "4111\u202f1111\u202f1111\u202f1111", "[card ****1111]"),
    ("double spaces", "4111  1111  1111  1111", "[card ****1111]"),
    ("glued to words", "card4111111111111111x", "card[card ****1111]x"),
    ("19 digits", "pan 4111111111111111110 end", "pan [card ****1110] end"),
    ("Luhn fails", "order 4111111111111112", "order 4111111111111112"),
    ("12 digits", "ref 123456789012", "ref 123456789012"),
    ("IBAN spaced", "to GB82 WEST 1234 5698 7654 32.", "to [iban GB**]."),
    ("IBAN lowercase", "gb82west12345698765432", "[iban GB**]"),
    ("IBAN glued", "iban:DE89370400440532013000!", "iban:[iban DE**]!"),
    ("IBAN mod-97 fails", "GB83WEST12345698765432", "GB83WEST12345698765432"),
    ("query token", "GET /health?token=abc123&x=1 HTTP/1.1", "GET /health?token=[secret]&x=1 HTTP/1.1"),
    ("query api_key and password", "/x?api_key=k1&password=p2", "/x?api_key=[secret]&password=[secret]"),
    ("query access_token", "cb?access_token=t&sig=s", "cb?access_token=[secret]&sig=[secret]"),
    ("plain words kept", "my key is safe", "my key is safe"),
]

@pytest.mark.parametrize("text,masked", [m[1:] for m in MASK], ids=[m[0] for m in MASK])
def test_mask_sensitive_table(text, masked):
    assert mask_sensitive(text) == masked

def test_mask_sensitive_given_secrets():
    assert mask_sensitive(f"Bearer {ADMIN} x", secrets=(ADMIN, "")) == "Bearer [secret] x"

# --- odd inputs -------------------------------------------------------------------------------------------------------

def test_invisible_message_and_chunked_body_over_1mb(tmp_path):
    def chunks(size=1_500_000):
        head, tail = b'{"message": "', b'", "max_tokens": 4}'
        yield head
        left = size - len(head) - len(tail)
        while left > 0: n = min(65536, left); yield b"a"*n; left -= n
        yield tail
    with serve(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        z = c.post("/api/v1/chat", json={"message": "\u200b\u200b\u200b", "max_tokens": 4})
        big = c.post("/api/v1/chat", content=chunks(), headers={"content-type": "application/json"})
        health = c.get("/health")
        chat = c.post("/api/v1/chat", json={"message": "still there?", "max_tokens": 4})
    assert z.status_code == 400 and err(z)["param"] == "message", z.text
    assert "content-length" not in big.request.headers and big.request.headers["transfer-encoding"] == "chunked"
    assert big.status_code == 413 and err(big)["type"] == "invalid_request_error", big.text
    assert health.status_code == 200 and chat.status_code == 200

# --- what an answer may cost and say ---------------------------------------------------------------------------------

class AskingRecorder(EchoAdapter):
    "Answers with a sentence that asks for the PIN, and records the `max_tokens` each request was given"
    seen: list = []
    async def _stream(self, prompt, max_tokens, temperature, **kw):
        type(self).seen.append(max_tokens)
        for d in ["Sure. Please type your ", "PIN here", " and I will check it. Then call us."]: yield d

def test_a_request_without_max_tokens_gets_the_default_and_no_credential_ask_reaches_it(tmp_path):
    AskingRecorder.seen = []
    msgs = [{"role": "user", "content": "hi"}]
    with serve(tmp_path, model=lambda cfg: AskingRecorder(cfg.llm_model_version, cfg), default_max_tokens=50) as srv, \
         httpx.Client(base_url=srv.url, timeout=30) as c:
        a = c.post("/api/v1/chat", json={"message": "hi"})
        b = c.post("/v1/chat/completions", json={"messages": msgs})
        s = c.post("/v1/chat/completions", json={"messages": msgs, "stream": True})
        big = c.post("/api/v1/chat", json={"message": "hi", "max_tokens": 100_000})
    streamed = "".join(json.loads(l[6:])["choices"][0]["delta"].get("content") or "" for l in s.text.split("\n")
                       if l.startswith("data: {") and json.loads(l[6:]).get("choices"))
    assert AskingRecorder.seen == [50, 50, 50]  # the setting, not a client's silence, bounds the cost
    assert big.status_code in (400, 422) and AskingRecorder.seen == [50, 50, 50]
    for text in (a.json()["text"], b.json()["choices"][0]["message"]["content"], streamed):
        assert "PIN" not in text and text.startswith("Sure. Please ") and text.endswith("Then call us."), text

# --- timeouts -----------------------------------------------------------------------------------------------------

@pytest.fixture
def hung():
    ModelFactory.register("hung", HungHealth)
    yield "hung"
    ModelFactory.REGISTRY.pop("hung", None)

def test_hung_health_check_is_504_and_a_failed_switch_is_recorded(tmp_path, hung):
    with serve(tmp_path, health_timeout_s=0.3) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/chat/completions", json=oa(hung))
        t_req = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = c.post(f"/api/v1/model/switch/{hung}", headers={"Authorization": f"Bearer {ADMIN}"})
        t_switch = time.perf_counter() - t0
        after = c.post("/api/v1/chat", json={"message": "hi", "max_tokens": 2})
    print(f"\n[hung] request {r.status_code} in {t_req:.2f} s, switch {s.status_code} in {t_switch:.2f} s")
    assert r.status_code == 504 and err(r)["type"] == "timeout_error", r.text
    assert s.status_code == 504 and s.json()["active"] == "custom-test", s.text
    assert t_req < 5 and t_switch < 5  # the health check is given 0.3 s; it would hang for an hour
    assert srv.pipe.switches[-1]["ok"] is False and srv.pipe.switches[-1]["requested"] == hung
    assert after.status_code == 200 and after.json()["model_version"] == "custom-test"

def test_offline_docs_serve_only_their_own_assets(tmp_path):
    "`/docs` loads Swagger UI from the package (no CDN); the static mount answers traversal attempts with 404, never a file"
    (tmp_path/"outside.txt").write_text("OUTSIDE-FILE-CONTENT")
    with serve(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        page = c.get("/docs")
        assets = [c.get(u) for u in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css")]
        probes = [c.get(u) for u in ("/static-offline-docs/../../../../etc/passwd", "/static-offline-docs/%2e%2e/%2e%2e/core.py",
                                     "/static-offline-docs/..%2f..%2f..%2fpyproject.toml", "/static-offline-docs/",
                                     f"/static-offline-docs/{'../'*12}{tmp_path.relative_to('/')}/outside.txt")]
    assert page.status_code == 200 and "cdn" not in page.text.lower() and "/static-offline-docs/swagger-ui-bundle.js" in page.text
    assert all(r.status_code == 200 and len(r.content) > 10_000 for r in assets)
    for r in probes:
        assert r.status_code == 404 and "root:" not in r.text and "OUTSIDE-FILE" not in r.text and "import" not in r.text, (r.url, r.status_code)

def test_retired_and_unknown_gemini_models_are_404s_that_say_why_without_the_key(tmp_path, caplog):
    "A client naming an allowlisted Gemini version Google retired, or one Google does not have: a clear 404, no key"
    from fake_gemini import shared_server
    from bankllm.adapters import gemini
    fake, key = shared_server().reset(), "AIzaSy-sec-KEY-never-echoed-0042"
    gemini._MODELS_CACHE.clear()
    caplog.set_level(logging.INFO, logger="bankllm")
    names = ["gemini_2.0_flash_v1.0.0", "gemini_3.5_flassh_v1.0.0"]
    with serve(tmp_path, models=names, gemini_api_key=key, gemini_base_url=fake.url) as srv, \
         httpx.Client(base_url=srv.url, timeout=30) as c:
        old, typo = [c.post("/v1/chat/completions", json=oa(n)) for n in names]
        chat = c.post("/api/v1/chat", json={"message": "hi", "model_version": names[0], "max_tokens": 4})
    assert old.status_code == 404 and "was shut down by Google" in err(old)["message"], old.text
    assert "use gemini_3.5_flash_v1.0.0" in err(old)["message"]
    assert typo.status_code == 404 and "model not found" in err(typo)["message"], typo.text
    assert "gemini-3.5-flash" in err(typo)["message"]  # what the key can use, from models.list
    for r in (old, typo, chat): assert key not in r.text and "Traceback" not in r.text
    assert not [r for r in fake.requests if "gemini-2.0-flash" in r.path]  # refused before any request to Google
    assert not any(key in r.getMessage() for r in caplog.records)
    fake.reset()

def test_openai_usage_bills_thinking_tokens_as_completion_tokens(tmp_path):
    "Gemini 3 thinks before answering and Google bills the thoughts: /v1 counts them, as OpenAI's reasoning_tokens"
    from fake_gemini import shared_server
    fake, name = shared_server().reset(), "gemini_3.5_flash_v1.0.0"
    with serve(tmp_path, models=[name], gemini_api_key="AIzaSy-usage-key-0001", gemini_base_url=fake.url) as srv, \
         httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=oa(name))
        s = c.post("/v1/chat/completions", json={**oa(name), "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    think = u["completion_tokens_details"]["reasoning_tokens"]
    assert think > 0 and u["completion_tokens"] > think and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    last = [json.loads(l[6:]) for l in s.text.split("\n") if l.startswith("data: {")][-1]
    assert last["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    fake.reset()

# --- conversations (#15): ids are keys in the store's namespace, never paths; history is bounded ---------------

def test_conversation_ids_cannot_be_paths_guessed_or_borrowed(tmp_path):
    "A path, a Redis-looking key or a short guess is refused; an unknown well-formed id starts empty; ids never leak history"
    with serve(tmp_path) as srv:
        url = f"{srv.url}/api/v1/chat"
        for bad in ["../../etc/passwd", "bankllm:conv:index", "1", "c-1", "a b" * 10, "%2e%2e%2f" * 4]:
            r = httpx.post(url, json={"message": "hi", "conversation_id": bad})
            assert r.status_code == 400 and "conversation_id" in r.json()["error"]["message"], bad
        mine = httpx.post(url, json={"message": "my IBAN question"}).json()["conversation_id"]
        httpx.post(url, json={"message": "second", "conversation_id": mine})
        guesses = [mine[:-1] + ("A" if mine[-1] != "A" else "B"), mine.upper(), mine + "x"]
        for g in guesses:  # near misses of a real id: each a new, empty conversation
            assert httpx.post(url, json={"message": "hi", "conversation_id": g}).json()["history_turns"] == 0
        assert not list((tmp_path/"state").glob("*passwd*"))
        files = sorted(p.name for p in (tmp_path/"state").iterdir())
        assert files[0] == "conversations.sqlite3" and all(f.startswith("conversations.sqlite3") for f in files)

def test_many_conversations_and_turns_stay_bounded(tmp_path):
    "A client opening many conversations, or one long one, costs at most the configured caps"
    with serve(tmp_path, conversation_max=20, conversation_max_turns=3) as srv:
        url = f"{srv.url}/api/v1/chat"
        with httpx.Client() as c:
            ids = [c.post(url, json={"message": f"q{i}"}).json()["conversation_id"] for i in range(60)]
            for i in range(10): r = c.post(url, json={"message": f"again {i}", "conversation_id": ids[-1]}).json()
        assert r["history_turns"] == 3
        db = sqlite3.connect(tmp_path/"state"/"conversations.sqlite3")
        assert db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 20
        assert db.execute("SELECT max(n) FROM (SELECT count(*) n FROM turns GROUP BY id)").fetchone()[0] == 3

def test_v1_history_is_bounded(tmp_path):
    "The messages a client sends back are bounded in count, length and total size"
    with serve(tmp_path) as srv:
        url = f"{srv.url}/v1/chat/completions"
        u = {"role": "user", "content": "hi"}
        assert httpx.post(url, json={"messages": [u] * 257}).status_code == 400                     # MAX_MESSAGES
        assert httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 4001}, u]}).status_code == 400
        big = [{"role": "assistant", "content": "y" * 15_000}, u] * 80                                 # > 1 MB body
        assert httpx.post(url, json={"messages": big}).status_code == 413


@pytest.mark.parametrize("name", ["cascade_custom:0.1,qlora", "cascade:custom:0.0,gemini", "cascade_custom-0.0_qlora"])
def test_a_client_names_the_cascade_but_never_describes_one(tmp_path, name):
    "The stages and thresholds come from BANKLLM_CASCADE only: a spec sent as a model name is a 404, and no stage is built"
    with serve(tmp_path) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=oa(name), timeout=30)
        plain = httpx.post(f"{srv.url}/v1/chat/completions", json=oa("cascade"), timeout=30)
    assert r.status_code == 404 and err(r)["code"] == "model_not_found", r.text
    assert plain.status_code == 404 and "set BANKLLM_CASCADE" in err(plain)["message"], plain.text  # none configured
    assert not any(a.family in ("custom", "qlora", "gemini") for a in ModelFactory.loaded())


def test_a_client_cannot_widen_the_beam_search(tmp_path):
    "Beams are a server setting (each costs a batch row): a client's beam fields are refused (ours) or change nothing (OpenAI's)"
    model = lambda cfg: custom_mod.CustomAdapter(CUSTOM, config=cfg)
    with serve(tmp_path, model=model, llm_model_version=CUSTOM, num_beams=2) as srv:
        r = httpx.post(f"{srv.url}/api/v1/chat", json={"message": "hi", "max_tokens": 4, "num_beams": 8}, timeout=60)
        assert r.status_code in (400, 422) and "num_beams" in r.text, r.text
        r = httpx.post(f"{srv.url}/api/v1/chat", json={"message": "hi", "max_tokens": 4, "beam_handoff_guard": False}, timeout=60)
        assert r.status_code in (400, 422) and "beam_handoff_guard" in r.text, r.text
        body = oa(CUSTOM, max_tokens=4) | {"temperature": 0, "num_beams": 8, "use_beam_search": True, "best_of": 8,
                                           "length_penalty": 4.0, "beam_handoff_guard": False}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        stats = srv.pipe.model.batch_stats()
    assert stats["max_batch_seen"] <= 2  # the configured two beams, not the eight asked for
    assert srv.pipe.model.config.beam_handoff_guard  # and the guard stays on
