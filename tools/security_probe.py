"""Security and robustness probe: attack a real `bankllm serve` process on loopback and report what happened.

Each probe starts (or reuses) a `bankllm serve` subprocess on a free 127.0.0.1 port, in its own fresh temporary
working directory, with settings passed as environment variables, sends its requests with httpx and records the
status codes, times and the server's memory (VmRSS / VmHWM from /proc/<pid>/status). Servers are always killed
at the end of their probe. A probe that errors becomes a row with the error; the script never stops half-way.

Probes: 1 path traversal in the model name, 2 checkpoint from the server's working directory, 3 existence oracle and
config echo, 4 QLoRA adapter traversal, 5 alias / unknown-model memory growth, 6 request flood with a queue limit,
7 abandoned requests, 8 anonymous benchmark-log parsing, 9 secrets in the server log, 10 odd inputs (zero-width text,
a chunked 1.5 MB body), 11 live latency during background benchmark rounds, 12 a Gemini endpoint that never answers.

Run it from the repository root with the project's virtualenv (loopback only; about 4-8 minutes on 2 cores):

    python tools/security_probe.py --label after --out benchmarks/security_probe_after.json

To probe other code (e.g. a git worktree of an older commit) put it first on the server's PYTHONPATH:

    git worktree add /tmp/bankllm-before HEAD
    python tools/security_probe.py --pythonpath /tmp/bankllm-before --label before \\
        --out benchmarks/security_probe_before.json

It prints a markdown table and writes the same rows (with more detail) as JSON to --out.
BANKLLM_DATA_DIR is passed through (default: ../shared/data next to the repository, if it exists).
"""

import argparse, asyncio, json, os, random, shutil, signal, socket, subprocess, sys, tempfile, threading, time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CUSTOM = "custom_model_built_0.0.0"
HOST = "127.0.0.1"
QUESTION = "How do I close my savings account and move my money?"
# settings from the caller's environment that must not leak into the servers under test
SCRUB_PREFIXES = ("BANKLLM_",)
SCRUB_NAMES = {"LLM_MODEL_VERSION", "ENABLE_BENCHMARKING", "BENCHMARK_INTERVAL_REQUESTS", "GEMINI_API_KEY", "GOOGLE_API_KEY"}
# settings every server gets (a probe's own settings win over these)
DEFAULT_SETTINGS = {
    "LLM_MODEL_VERSION": CUSTOM,
    "ENABLE_BENCHMARKING": "false",
    "BANKLLM_MAX_MODELS": "3",            # read by newer code only: adapters kept in the factory's cache
    "BANKLLM_MODELS": CUSTOM,             # read by newer code only: extra model names clients may use (comma-separated)
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # no network here: never wait on the hub
    "PYTHONUNBUFFERED": "1",              # log lines reach the log file as they are written
}

_LIVE: list["Server"] = []     # servers to kill on any exit


# ----------------------------------------------------------------------------------------------------------------
# helpers

def free_port()->int:
    with socket.socket() as s:
        s.bind((HOST, 0)); return s.getsockname()[1]

def proc_status(pid:int, key:str)->float|None:
    "A /proc/<pid>/status memory field (VmRSS, VmHWM) in MiB, None when the process is gone"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"): return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError): return None
    return None

def counted(outcomes)->dict:
    "Status codes (or exception names) counted, as {'200': 3, 'ReadTimeout': 1}"
    return dict(sorted(Counter(str(o) for o in outcomes).items()))

def pct(xs:list[float], q:float)->float|None:
    "Linear-interpolated percentile (same rule as bankllm's)"
    if not xs: return None
    xs = sorted(xs); pos = (len(xs)-1) * q/100; lo = int(pos); hi = min(lo+1, len(xs)-1)
    return xs[lo] + (xs[hi]-xs[lo]) * (pos-lo)

def r3(x): return None if x is None else round(x, 3)

def excerpt(text:str, n:int=240)->str: return text if len(text) <= n else text[:n] + "..."

def chat_body(message:str=QUESTION, max_tokens:int=4, temperature:float=0.0)->dict:
    return {"message": message, "max_tokens": max_tokens, "temperature": temperature}

def oa_body(model:str, max_tokens:int=4, content:str="hi")->dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}

async def atimed(client:httpx.AsyncClient, method:str, url:str, **kw)->dict:
    "One request: status (or the exception's name), seconds, headers, body text"
    t0 = time.perf_counter()
    try:
        r = await client.request(method, url, **kw)
        return dict(status=r.status_code, s=time.perf_counter()-t0, headers=dict(r.headers), text=r.text)
    except Exception as e:
        return dict(status=type(e).__name__, s=time.perf_counter()-t0, headers={}, text=str(e))

def timed(client:httpx.Client, method:str, url:str, **kw)->dict:
    t0 = time.perf_counter()
    try:
        r = client.request(method, url, **kw)
        return dict(status=r.status_code, s=time.perf_counter()-t0, headers=dict(r.headers), text=r.text)
    except Exception as e:
        return dict(status=type(e).__name__, s=time.perf_counter()-t0, headers={}, text=str(e))


# ----------------------------------------------------------------------------------------------------------------
# the server under test

class Server:
    "`bankllm serve` in a subprocess, in its own working directory, with its output in a log file"
    def __init__(self, ctx:"Ctx", name:str, settings:dict|None=None, setup=None, cli_args:tuple=(),
                 ready_timeout_s:float=90, stop_timeout_s:float=15):
        self.ctx, self.name, self.setup = ctx, name, setup
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=ctx.root))
        self.log_path = self.dir/"server.log"
        self.settings = {"BANKLLM_BENCHMARK_LOG": str(self.dir/"benchmark_log.jsonl"), **(settings or {})}
        self.cli_args, self.ready_timeout_s, self.stop_timeout_s = tuple(cli_args), ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen|None = None
        self.port = None; self.starts = 0

    @property
    def url(self)->str: return f"http://{HOST}:{self.port}"
    @property
    def pid(self)->int|None: return self.proc.pid if self.proc else None

    def start(self)->"Server":
        if self.setup is not None and self.starts == 0: self.setup(self.dir)
        self.port = free_port(); self.starts += 1
        env = self.ctx.env(self.settings)
        cmd = [self.ctx.python, "-c", "from bankllm.cli import main; main()", "serve", "--host", HOST,
               "--port", str(self.port), *self.cli_args]
        log = open(self.log_path, "ab")
        try: self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally: log.close()
        _LIVE.append(self)
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}: {excerpt(self.log_tail(), 600)}")
                try:
                    if c.get(self.url + "/health").status_code == 200: return self
                except httpx.HTTPError: pass
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server {self.name} not ready within {self.ready_timeout_s:g}s: {excerpt(self.log_tail(), 600)}")

    def ensure_up(self)->"Server":
        "Restart the server if it died (so a crash in one probe does not fail the next)"
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None: self.ctx.note(f"server {self.name} had died (exit {self.proc.returncode}); restarted")
            self.start()
        return self

    def alive(self)->bool: return self.proc is not None and self.proc.poll() is None
    def rss(self)->float|None: return proc_status(self.pid, "VmRSS") if self.alive() else None
    def hwm(self)->float|None: return proc_status(self.pid, "VmHWM") if self.alive() else None

    def log_text(self)->str:
        try: return self.log_path.read_text(errors="replace")
        except OSError: return ""
    def log_tail(self, n:int=2000)->str: return self.log_text()[-n:]

    def stop(self):
        "SIGTERM, then SIGKILL after `stop_timeout_s`; idempotent"
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try: p.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                try: p.wait(10)
                except subprocess.TimeoutExpired: pass
        if self in _LIVE: _LIVE.remove(self)

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


def _kill_all():
    for s in list(_LIVE): s.stop()


# ----------------------------------------------------------------------------------------------------------------
# the run's context

class Ctx:
    "Options, the base environment, the temporary root, and where the code under test lives"
    def __init__(self, a:argparse.Namespace):
        self.a, self.python = a, a.python or sys.executable
        self.root = Path(tempfile.mkdtemp(prefix="bankllm-probe-"))
        self.t0 = time.monotonic()
        self.notes: list[str] = []
        self.overrides = dict(kv.split("=", 1) for kv in a.server_env)
        self.data_dir = a.data_dir or os.environ.get("BANKLLM_DATA_DIR") or (
            str(REPO.parent/"shared"/"data") if (REPO.parent/"shared"/"data").is_dir() else None)

    def note(self, msg:str): print(f"  note: {msg}", flush=True); self.notes.append(msg)
    def elapsed(self)->float: return time.monotonic() - self.t0
    def left(self)->float: return self.a.budget_s - self.elapsed()

    def env(self, settings:dict)->dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB_PREFIXES) and k not in SCRUB_NAMES}
        if self.a.pythonpath: env["PYTHONPATH"] = os.pathsep.join(p for p in (self.a.pythonpath, env.get("PYTHONPATH")) if p)
        env["BANKLLM_CACHE_DIR"] = str(self.root/"cache")   # exports and downloads of this run stay in its temp root
        if self.data_dir: env["BANKLLM_DATA_DIR"] = self.data_dir
        env.update(DEFAULT_SETTINGS); env.update(self.overrides); env.update(settings)
        return env

    def discover(self)->dict:
        "Which bankllm the servers import, its checkpoints folder and the git commit it is at"
        code = ("import bankllm, bankllm.training as t; print(bankllm.__file__); print(t.checkpoints_dir())")
        out = subprocess.run([self.python, "-c", code], cwd=self.root, env=self.env({}), capture_output=True,
                             text=True, timeout=120)
        if out.returncode: raise RuntimeError(f"cannot import bankllm for the server: {out.stderr[-800:]}")
        pkg_file, ckdir = out.stdout.strip().splitlines()[-2:]
        self.pkg_file, self.checkpoints = pkg_file, Path(ckdir)
        self.shipped = self.checkpoints/CUSTOM
        if not (self.shipped/"model.safetensors").is_file(): raise RuntimeError(f"no shipped checkpoint at {self.shipped}")
        try:
            commit = subprocess.run(["git", "-C", str(Path(pkg_file).parent), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
            dirty = subprocess.run(["git", "-C", str(Path(pkg_file).parent), "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception: commit, dirty = None, ""
        return dict(bankllm_file=pkg_file, checkpoints_dir=ckdir, git_commit=commit,
                    package_has_uncommitted_changes=bool(dirty))

    def plant(self, where:Path, config_extra:dict|None=None)->Path:
        "A copy of the shipped checkpoint at `where` (optionally with extra keys in its config.json)"
        where.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.shipped, where)
        if config_extra:
            cfg = json.loads((where/"config.json").read_text())
            (where/"config.json").write_text(json.dumps({**config_extra, **cfg}))
        return where


def row(pid:int, probe:str, sent:str, statuses:dict|None=None, times:dict|None=None, rss:dict|None=None,
        verdict:str="", **details)->dict:
    return dict(id=pid, probe=probe, sent=sent, statuses=statuses or {}, times_s=times or {}, rss_mib=rss or {},
                verdict=verdict, details=details)


# ----------------------------------------------------------------------------------------------------------------
# probes 1-4: model names that reach the file system (one server)

def setup_model_names(ctx:Ctx):
    def setup(d:Path):
        ctx.plant(d/"planted"/"x")                                        # probe 1: outside the package
        ctx.plant(d/"custom_cwd")                                         # probe 2: in the server's cwd
        ctx.plant(d/"custom_cwd2")                                        # probe 3: an existing name
        ctx.plant(d/"custom_evil", config_extra={"secret_key_from_file": 1})  # probe 3: a file's content echoed?
    return setup

def traversal_name(ctx:Ctx, target:Path)->str:
    "`custom_model_built_0.0.0/` + enough `../` to climb from the package's checkpoints folder to / + `target`"
    start = Path(os.path.realpath(ctx.checkpoints/CUSTOM))
    ups = len(start.parts) - 1                              # components below /
    return f"{CUSTOM}/" + "../"*ups + str(Path(os.path.realpath(target))).lstrip("/")

def probe_traversal(ctx:Ctx, srv:Server)->dict:
    name = traversal_name(ctx, srv.dir/"planted"/"x")
    with httpx.Client(timeout=60) as c: r = timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body(name))
    ok = r["status"] == 200
    verdict = ("VULNERABLE: loaded a checkpoint from outside the package through ../ in the model name" if ok else
               f"refused ({r['status']})" if isinstance(r["status"], int) and r["status"] < 500 else
               f"not served, but answered {r['status']}")
    return row(1, "path traversal (model name with ../)", f"POST /v1/chat/completions model={name!r} max_tokens=4",
               counted([r["status"]]), {"request": r3(r["s"])}, {"after": srv.rss()}, verdict,
               model=name, model_chars=len(name), body=excerpt(r["text"]))

def probe_cwd(ctx:Ctx, srv:Server)->dict:
    with httpx.Client(timeout=60) as c: r = timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body("custom_cwd"))
    verdict = ("VULNERABLE: served a checkpoint planted in the server's working directory" if r["status"] == 200 else
               f"refused ({r['status']})")
    return row(2, "checkpoint from server cwd", "POST /v1/chat/completions model='custom_cwd' (planted in cwd)",
               counted([r["status"]]), {"request": r3(r["s"])}, {"after": srv.rss()}, verdict, body=excerpt(r["text"]))

def probe_oracle(ctx:Ctx, srv:Server)->dict:
    with httpx.Client(timeout=60) as c:
        miss = timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body("custom_nosuchfolder"))
        have = timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body("custom_cwd2"))
        evil = timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body("custom_evil"))
    differs = miss["status"] != have["status"]
    leak = "secret_key_from_file" in evil["text"]
    parts = []
    parts.append(f"ORACLE: missing folder -> {miss['status']}, existing folder -> {have['status']}" if differs else
                 f"no status oracle (both {miss['status']})")
    parts.append("LEAK: body echoes a key from the planted config.json" if leak else "config.json content not echoed")
    return row(3, "existence oracle + config echo",
               "model='custom_nosuchfolder' vs 'custom_cwd2' (planted); 'custom_evil' (config.json with an extra key)",
               {"missing": miss["status"], "existing": have["status"], "evil": evil["status"]},
               {"missing": r3(miss["s"]), "existing": r3(have["s"]), "evil": r3(evil["s"])}, {"after": srv.rss()},
               "; ".join(parts), secret_key_in_body=leak, body_missing=excerpt(miss["text"]),
               body_existing=excerpt(have["text"]), body_evil=excerpt(evil["text"]))

def probe_qlora(ctx:Ctx, srv:Server)->dict:
    name = "qlora_" + "../"*8 + "etc"
    with httpx.Client(timeout=60) as c: r = timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body(name))
    mentions = "/etc" in r["text"]
    verdict = (f"{r['status']}; " + ("body echoes the /etc path" if mentions else "body does not mention /etc"))
    if r["status"] == 200: verdict = "VULNERABLE: served an adapter name with ../; " + verdict
    return row(4, "qlora adapter traversal", f"POST /v1/chat/completions model={name!r}", counted([r["status"]]),
               {"request": r3(r["s"])}, {"after": srv.rss()}, verdict, body_mentions_etc=mentions, body=excerpt(r["text"]))


# ----------------------------------------------------------------------------------------------------------------
# probe 5: aliases and unknown names, each a new cached adapter?

def probe_aliases(ctx:Ctx, srv:Server)->dict:
    out, deadline = [], time.monotonic() + 300
    with httpx.Client(timeout=60) as c:
        m0 = c.get(srv.url + "/metrics").text.count("\n")
        rss0 = srv.rss(); t0 = time.perf_counter()
        for k in range(1, 101):
            if time.monotonic() > deadline: ctx.note("aliases: stopped early (time)"); break
            out.append(timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body(CUSTOM + "/"*k, max_tokens=2))["status"])
        t_alias, rss_mid = time.perf_counter() - t0, srv.rss(); t1 = time.perf_counter()
        for i in range(140):
            if time.monotonic() > deadline: ctx.note("aliases: stopped early (time)"); break
            out.append(timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body(f"gemini_{i}", max_tokens=2))["status"])
        t_gem = time.perf_counter() - t1
        rss1 = srv.rss()
        m1 = c.get(srv.url + "/metrics").text.count("\n")
    growth = None if rss0 is None or rss1 is None else round(rss1 - rss0, 1)
    verdict = (f"RSS +{growth} MiB over {len(out)} requests, /metrics {m0}->{m1} lines; "
               + ("VULNERABLE: memory grows with model-name variants (goal < 150 MiB)" if growth is not None and growth >= 150
                  else "within the 150 MiB goal"))
    return row(5, "model aliases / unknown names",
               f"100x model='{CUSTOM}'+'/'*k (k=1..100, max_tokens 2), then 140x model='gemini_i' (no key)",
               counted(out), {"aliases_100": r3(t_alias), "gemini_140": r3(t_gem)},
               {"before": rss0, "after_aliases": rss_mid, "after": rss1, "growth": growth}, verdict,
               statuses_aliases=counted(out[:100]), statuses_gemini=counted(out[100:]),
               metrics_lines_before=m0, metrics_lines_after=m1)


# ----------------------------------------------------------------------------------------------------------------
# probe 6: a flood against a queue limit

def probe_flood(ctx:Ctx, srv:Server)->dict:
    async def go():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(atimed(c, "POST", srv.url + "/api/v1/chat", json=chat_body(QUESTION, 256, 0.0))
                                         for _ in range(32)))
            return res, time.perf_counter() - t0
    rss0 = srv.rss()
    res, wall = asyncio.run(go())
    rej = [r for r in res if r["status"] == 429]
    ok = [r for r in res if r["status"] == 200]
    retry_after = [("retry-after" in r["headers"]) for r in rej]
    times = {"wall": r3(wall), "max_200": r3(max((r["s"] for r in ok), default=None)),
             "max_429": r3(max((r["s"] for r in rej), default=None))}
    if not rej: verdict = f"no back-pressure: all {len(res)} requests queued (slowest {times['max_200']} s)"
    else: verdict = (f"{len(rej)} of {len(res)} refused with 429 (slowest 429 {times['max_429']} s); Retry-After on "
                     f"{sum(retry_after)}/{len(rej)}")
    return row(6, "flood (BANKLLM_MAX_QUEUE=4)", "32 concurrent POST /api/v1/chat max_tokens 256 temperature 0",
               counted(r["status"] for r in res), times, {"before": rss0, "after": srv.rss()}, verdict,
               retry_after_on_all_429=bool(rej) and all(retry_after), retry_after_values=sorted({r["headers"].get("retry-after") for r in rej} - {None}))


# ----------------------------------------------------------------------------------------------------------------
# probe 7: requests whose clients gave up

async def _in_flight(c:httpx.AsyncClient, url:str)->float|None:
    try:
        for line in (await c.get(url + "/metrics", timeout=5)).text.splitlines():
            if line.startswith("bankllm_in_flight_requests"): return float(line.split()[-1])
    except Exception: return None
    return None

def probe_abandoned(ctx:Ctx, srv:Server)->dict:
    async def go():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            small = lambda: atimed(c, "POST", srv.url + "/api/v1/chat", json=chat_body(QUESTION, 4, 0.0))
            await small()                                   # warm-up
            base = await small()                            # idle baseline
            gone = await asyncio.gather(*(atimed(c, "POST", srv.url + "/api/v1/chat", json=chat_body(QUESTION, 512, 2.0),
                                                 timeout=0.3) for _ in range(16)))
            after = await small()
            t0, drain = time.perf_counter(), None
            while time.perf_counter() - t0 < 60:              # how long the server stays busy with abandoned work
                if await _in_flight(c, srv.url) == 0: drain = time.perf_counter() - t0; break
                await asyncio.sleep(0.1)
            return base, gone, after, drain
    base, gone, after, drain = asyncio.run(go())
    ratio = after["s"] / base["s"] if isinstance(after["status"], int) and base["s"] else None
    verdict = (f"4-token request after 16 abandoned: {after['s']:.2f} s vs {base['s']:.3f} s idle ({ratio:.0f}x); "
               + ("abandoned work still runs" if ratio and ratio > 5 else "abandoned work does not delay it much")) if ratio \
              else f"the 4-token request failed: {after['status']}"
    return row(7, "abandoned requests",
               "16 concurrent POST /api/v1/chat max_tokens 512 temperature 2.0, client gives up after 0.3 s; then max_tokens 4",
               {"abandoned": counted(r["status"] for r in gone), "idle_4tok": base["status"], "after_4tok": after["status"]},
               {"idle_4tok": r3(base["s"]), "after_4tok": r3(after["s"]),
                "in_flight_zero_after": r3(drain)}, {"after": srv.rss()}, verdict, ratio=r3(ratio))


# ----------------------------------------------------------------------------------------------------------------
# probe 8: a large benchmark log parsed for anyone who asks

def write_big_log(path:Path, target_bytes:int=50_000_000, seed:int=0)->dict:
    "Valid `benchmark_round` JSON lines (the shape `_run_round` writes) until the file has `target_bytes`"
    rng, n, size = random.Random(seed), 0, 0
    with open(path, "w") as f:
        while size < target_bytes:
            n += 1
            def model(v, fam, base):
                lat = [round(rng.lognormvariate(base, 0.3), 3) for _ in range(150)]
                return dict(model_version=v, family=fam, status="ok", reason=None, device="cpu", n=len(lat), errors=0,
                            latencies_ms=lat, tokens_mean=60.0, topic_accuracy=round(rng.random(), 3),
                            rouge_l=round(rng.random(), 3), quality_n=5, quality_reason=None, sweep=[])
            rec = dict(type="benchmark_round", round=n, round_id=f"{n:032x}", status="ok", error=None,
                       started_at="2025-01-01T00:00:00.000+00:00", finished_at="2025-01-01T00:00:01.000+00:00",
                       duration_ms=1000.0, triggered_by=n*100, coalesced=[], triggers=1, request_count=n*100,
                       active_model=CUSTOM, pipeline_version="1.0.0", pid=1, suite={},
                       models=[model(CUSTOM, "custom", 4.0), model("qlora_vllm_finetuned_model_v1.1.0", "qlora", 5.0),
                               dict(model_version="gemini_3.5_flash_v1.0.0", family="gemini", status="unavailable",
                                    reason="no key", latencies_ms=[], errors=0, quality_n=0)])
            line = json.dumps(rec, separators=(",", ":")) + "\n"
            f.write(line); size += len(line)
    return dict(rounds=n, bytes=size)

def probe_big_log(ctx:Ctx, srv:Server)->dict:
    samples, stop = [], threading.Event()
    def sampler():
        while not stop.is_set():
            if (x := srv.rss()) is not None: samples.append(x)
            time.sleep(0.05)
    async def go():
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            chat = lambda: atimed(c, "POST", srv.url + "/api/v1/chat", json=chat_body(QUESTION, 4, 0.0))
            await chat(); idle = await chat()
            calls = [asyncio.create_task(atimed(c, "GET", srv.url + "/api/v1/benchmark/summary", params={"from_log": "true"}))
                     for _ in range(4)]
            await asyncio.sleep(0.3)
            during = await chat()
            return idle, during, await asyncio.gather(*calls)
    rss0 = srv.rss()
    th = threading.Thread(target=sampler, daemon=True); th.start()
    try: idle, during, res = asyncio.run(go())
    finally: stop.set(); th.join(5)
    peak = max(samples, default=None)
    ok = [r for r in res if r["status"] == 200]
    rounds = None
    if ok:
        try: rounds = json.loads(ok[0]["text"]).get("rounds")
        except ValueError: pass
    verdict = (f"{len(ok)}/4 anonymous summaries parsed the log ({rounds} rounds); peak RSS {peak} MiB "
               f"(+{round(peak - rss0, 1) if peak and rss0 else '?'}); chat during: {during['s']:.2f} s vs {idle['s']:.3f} s idle")
    if ok: verdict = "OPEN: " + verdict
    return row(8, "anonymous benchmark-log parsing", f"~{ctx.big_log['bytes']/1e6:.0f} MB log ({ctx.big_log['rounds']} rounds); "
               "4 parallel GET /api/v1/benchmark/summary?from_log=true, no auth; a 4-token chat meanwhile",
               counted(r["status"] for r in res),
               {"summary_calls": [r3(r["s"]) for r in res], "chat_idle": r3(idle["s"]), "chat_during": r3(during["s"])},
               {"before": rss0, "peak_sampled": peak, "vmhwm": srv.hwm()}, verdict, rounds_reported=rounds,
               chat_during_status=during["status"])


# ----------------------------------------------------------------------------------------------------------------
# probes 9-10: the log, and odd inputs (one server, default log level: info, access log on)

CARD_MESSAGE = ("my card is 4111.1111.1111.1111 and 4111 1111 1111 1111 and card4111111111111111 and my iban is "
                "gb82west12345698765432")
LEAK_MARKERS = {"token query (SUPERSECRET123)": "SUPERSECRET123", "api_key query (SUPERSECRET456)": "SUPERSECRET456",
                "card 4111.1111.1111.1111": "4111.1111.1111.1111", "card 4111 1111 1111 1111": "4111 1111 1111 1111",
                "card4111111111111111": "4111111111111111", "iban gb82west...": "gb82west"}

def probe_log_secrets(ctx:Ctx, srv:Server)->dict:
    with httpx.Client(timeout=60) as c:
        h = timed(c, "GET", srv.url + "/health", params={"token": "SUPERSECRET123", "api_key": "SUPERSECRET456"})
        p = timed(c, "POST", srv.url + "/api/v1/chat", json=chat_body(CARD_MESSAGE, 4, 0.0))
    time.sleep(0.5)
    log = srv.log_text(); low = log.lower()
    leaked = [k for k, m in LEAK_MARKERS.items() if m.lower() in low]
    lines = [excerpt(l, 200) for l in log.splitlines() if any(m.lower() in l.lower() for m in LEAK_MARKERS.values())][:6]
    verdict = ("LEAKED to the server log: " + ", ".join(leaked)) if leaked else "nothing of these reached the log"
    return row(9, "secrets in server log", "GET /health?token=SUPERSECRET123&api_key=SUPERSECRET456; "
               "POST /api/v1/chat with card numbers and an IBAN (max_tokens 4)",
               {"health": h["status"], "chat": p["status"]}, {"health": r3(h["s"]), "chat": r3(p["s"])},
               {"after": srv.rss()}, verdict, leaked=leaked, leaking_lines=lines, log_lines=log.count("\n"))

def probe_inputs(ctx:Ctx, srv:Server)->dict:
    size = 1_500_000
    def body():
        head, tail = b'{"message": "', b'", "max_tokens": 4}'
        yield head
        left = size - len(head) - len(tail)
        while left > 0:
            n = min(65536, left); yield b"a"*n; left -= n
        yield tail
    with httpx.Client(timeout=30) as c:
        z = timed(c, "POST", srv.url + "/api/v1/chat", json=chat_body("\u200b\u200b\u200b", 4, 0.0))
        ch = timed(c, "POST", srv.url + "/api/v1/chat", content=body(), headers={"content-type": "application/json"})
        alive = timed(c, "GET", srv.url + "/health")["status"]
    parts = [("ACCEPTED an invisible-only message (200)" if z["status"] == 200 else f"zero-width message -> {z['status']}"),
             f"chunked 1.5 MB body -> {ch['status']}" + (" (refused as too large)" if ch["status"] == 413 else
                 " (refused, but not as too large)" if ch["status"] == 400 else " (ACCEPTED)" if ch["status"] == 200 else ""),
             f"server afterwards: {alive}"]
    return row(10, "odd inputs", 'POST /api/v1/chat message="\\u200b\\u200b\\u200b"; a 1.5 MB chunked body (no Content-Length)',
               {"zero_width": z["status"], "chunked_1.5MB": ch["status"], "health_after": alive},
               {"zero_width": r3(z["s"]), "chunked": r3(ch["s"])}, {"after": srv.rss()}, "; ".join(parts),
               body_zero_width=excerpt(z["text"], 160), body_chunked=excerpt(ch["text"], 160))


# ----------------------------------------------------------------------------------------------------------------
# probe 11: live latency while benchmark rounds run in the background

def _live_latencies(ctx:Ctx, srv:Server, n:int=40)->tuple[list, list]:
    lat, st, deadline = [], [], time.monotonic() + 240
    with httpx.Client(timeout=120) as c:
        for _ in range(n):
            if time.monotonic() > deadline: ctx.note(f"{srv.name}: stopped early (time)"); break
            r = timed(c, "POST", srv.url + "/api/v1/chat", json=chat_body("How do I activate my card?", 32, 0.0))
            st.append(r["status"])
            if r["status"] == 200: lat.append(r["s"]*1000)
    return lat, st

def _logged_rounds(path:Path)->int:
    try: return sum('"benchmark_round"' in l for l in path.read_text().splitlines())
    except OSError: return 0

def probe_benchmark_latency(ctx:Ctx)->dict:
    res = {}
    for mode, on in (("off", "false"), ("on", "true")):
        if ctx.left() < 60: raise RuntimeError("time budget spent before the benchmarking=on half")
        with Server(ctx, f"p11-bench-{mode}", {"ENABLE_BENCHMARKING": on, "BENCHMARK_INTERVAL_REQUESTS": "5"},
                    stop_timeout_s=35) as srv:
            lat, st = _live_latencies(ctx, srv)
            started = logged = None
            if on == "true":
                try: started = httpx.get(srv.url + "/api/v1/benchmark/summary", timeout=30).json()["benchmarking"]["rounds_started"]
                except Exception: started = None
                deadline = time.monotonic() + 60          # give a round in flight the chance to reach the log
                while time.monotonic() < deadline and started and not _logged_rounds(srv.dir/"benchmark_log.jsonl"):
                    time.sleep(0.5)
                logged = _logged_rounds(srv.dir/"benchmark_log.jsonl")
                if not logged: ctx.note(f"benchmarking on: the benchmark log shows no rounds (rounds started: {started})")
            res[mode] = dict(p50=pct(lat, 50), p95=pct(lat, 95), statuses=counted(st), rounds_started=started, lat=lat,
                             rounds_logged=logged, rss=srv.rss())
    off, on = res["off"], res["on"]
    r50 = on["p50"]/off["p50"] if on["p50"] and off["p50"] else None
    r95 = on["p95"]/off["p95"] if on["p95"] and off["p95"] else None
    verdict = (f"p50 {off['p50']:.0f} -> {on['p50']:.0f} ms (x{r50:.2f}), p95 {off['p95']:.0f} -> {on['p95']:.0f} ms "
               f"(x{r95:.2f}); rounds started {on['rounds_started']}, logged {on['rounds_logged']}") if r50 and r95 else \
              "no latencies to compare"
    if on["rounds_logged"] == 0: verdict += "; NOTE: the benchmark log shows no rounds"
    return row(11, "live latency during benchmark rounds",
               "40 sequential POST /api/v1/chat 'How do I activate my card?' max_tokens 32 temperature 0, "
               "ENABLE_BENCHMARKING=false vs true (BENCHMARK_INTERVAL_REQUESTS=5)",
               {"off": off["statuses"], "on": on["statuses"]},
               {"p50_ms_off": r3(off["p50"]), "p95_ms_off": r3(off["p95"]), "p50_ms_on": r3(on["p50"]),
                "p95_ms_on": r3(on["p95"]), "max_ms_off": r3(max(off["lat"], default=None)),
                "max_ms_on": r3(max(on["lat"], default=None)), "ratio_p50": r3(r50), "ratio_p95": r3(r95)},
               {"off_after": off["rss"], "on_after": on["rss"]}, verdict,
               rounds_started=on["rounds_started"], rounds_logged=on["rounds_logged"],
               latencies_ms_off=[round(x, 1) for x in off["lat"]], latencies_ms_on=[round(x, 1) for x in on["lat"]])


# ----------------------------------------------------------------------------------------------------------------
# probe 12: a Gemini endpoint that accepts connections and never answers

class HungServer:
    "Accepts TCP connections on loopback and never answers"
    def __init__(self):
        self.sock = socket.socket(); self.sock.bind((HOST, 0)); self.sock.listen(64); self.sock.settimeout(0.2)
        self.port, self.conns, self.stop_ev = self.sock.getsockname()[1], [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
    def _run(self):
        while not self.stop_ev.is_set():
            try: conn, _ = self.sock.accept(); self.conns.append(conn)
            except (socket.timeout, OSError): continue
    def __enter__(self): self.thread.start(); return self
    def __exit__(self, *exc):
        self.stop_ev.set(); self.thread.join(5)
        for c in self.conns: c.close()
        self.sock.close()

def probe_hung_gemini(ctx:Ctx)->dict:
    with HungServer() as hung:
        settings = {"GEMINI_API_KEY": "fake-key-for-probe", "BANKLLM_GEMINI_BASE_URL": f"http://{HOST}:{hung.port}",
                    "BANKLLM_REQUEST_TIMEOUT_S": "5", "BANKLLM_GEMINI_TIMEOUT_S": "2"}
        with Server(ctx, "p12-hung-gemini", settings) as srv:
            with httpx.Client(timeout=90) as c: r = timed(c, "POST", srv.url + "/v1/chat/completions", json=oa_body("gemini"))
            key_in_body = "fake-key-for-probe" in r["text"]
            time.sleep(0.3)
            key_in_log = "fake-key-for-probe" in srv.log_text()
            rss = srv.rss()
        conns = len(hung.conns)
    verdict = f"{r['status']} after {r['s']:.1f} s ({conns} connection(s) to the hung endpoint)"
    if isinstance(r["status"], str): verdict = f"HUNG: no answer within the client's 90 s ({r['status']})"
    elif r["s"] > 15: verdict += "; slow: beyond the 5 s request timeout"
    if key_in_body or key_in_log: verdict += f"; API KEY LEAKED ({'body' if key_in_body else ''}{' log' if key_in_log else ''})"
    return row(12, "hung Gemini endpoint", "POST /v1/chat/completions model='gemini', Gemini base URL that never answers, "
               "REQUEST_TIMEOUT_S=5, GEMINI_TIMEOUT_S=2", counted([r["status"]]), {"request": r3(r["s"])},
               {"after": rss}, verdict, connections_to_hung_endpoint=conns, key_in_body=key_in_body,
               key_in_log=key_in_log, body=excerpt(r["text"]))


# ----------------------------------------------------------------------------------------------------------------
# running the probes

PROBES = {1: "path traversal (model name with ../)", 2: "checkpoint from server cwd", 3: "existence oracle + config echo",
          4: "qlora adapter traversal", 5: "model aliases / unknown names", 6: "flood (BANKLLM_MAX_QUEUE=4)",
          7: "abandoned requests", 8: "anonymous benchmark-log parsing", 9: "secrets in server log", 10: "odd inputs",
          11: "live latency during benchmark rounds", 12: "hung Gemini endpoint"}

def run_one(ctx:Ctx, rows:list, pid:int, fn, srv:Server|None=None):
    "Run probe `pid`; an error (or the spent time budget) becomes its row"
    if pid not in ctx.a.only: return
    print(f"[{ctx.elapsed():6.1f}s] probe {pid}: {PROBES[pid]}", flush=True)
    t0 = time.perf_counter()
    try:
        if ctx.left() < 20: raise RuntimeError("skipped: the time budget is spent")
        if srv is not None: srv.ensure_up()
        r = fn(ctx, srv) if srv is not None else fn(ctx)
    except Exception as e:
        r = row(pid, PROBES[pid], "", verdict=f"ERROR: {type(e).__name__}: {excerpt(str(e), 300)}",
                error=f"{type(e).__name__}: {e}")
    r["seconds"] = round(time.perf_counter() - t0, 2)
    if srv is not None: r["server"] = dict(name=srv.name, starts=srv.starts, settings=srv.settings, cli_args=list(srv.cli_args))
    print(f"         -> {r['verdict']}", flush=True)
    rows.append(r)

def with_server(ctx:Ctx, rows:list, name:str, probes:list, settings:dict|None=None, setup=None, cli_args=()):
    "Start one server for `probes` (pairs of id and function), run them in order, always stop it"
    todo = [(p, f) for p, f in probes if p in ctx.a.only]
    if not todo: return
    srv = Server(ctx, name, settings, setup, cli_args)
    try:
        try: srv.start()
        except Exception as e:
            for p, _ in todo:
                rows.append(row(p, PROBES[p], "", verdict=f"ERROR: server did not start: {excerpt(str(e), 300)}",
                                error=str(e)))
            return
        for p, f in todo: run_one(ctx, rows, p, f, srv)
    finally: srv.stop()

def run_all(ctx:Ctx)->list[dict]:
    rows: list[dict] = []
    with_server(ctx, rows, "p01-04-model-names", [(1, probe_traversal), (2, probe_cwd), (3, probe_oracle), (4, probe_qlora)],
                setup=setup_model_names(ctx))
    with_server(ctx, rows, "p05-aliases", [(5, probe_aliases)])
    with_server(ctx, rows, "p06-flood", [(6, probe_flood)], settings={"BANKLLM_MAX_QUEUE": "4"})
    with_server(ctx, rows, "p07-abandoned", [(7, probe_abandoned)])
    def big_log(d:Path): ctx.big_log = write_big_log(d/"benchmark_log.jsonl")
    with_server(ctx, rows, "p08-big-log", [(8, probe_big_log)], setup=big_log)
    with_server(ctx, rows, "p09-10-log-inputs", [(9, probe_log_secrets), (10, probe_inputs)], cli_args=("--log-level", "info"))
    run_one(ctx, rows, 11, probe_benchmark_latency)
    run_one(ctx, rows, 12, probe_hung_gemini)
    return sorted(rows, key=lambda r: r["id"])


# ----------------------------------------------------------------------------------------------------------------
# the report

def _cell(v)->str:
    if isinstance(v, dict): s = ", ".join(f"{k}: {_cell(x)}" for k, x in v.items())
    elif isinstance(v, list): s = "[" + ", ".join(_cell(x) for x in v) + "]"
    elif v is None: s = "–"
    else: s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")

def markdown(rows:list[dict], label:str)->str:
    out = [f"Security probe: {label}", "",
           "| # | probe | sent | statuses | times (s; ms where named) | RSS (MiB) | verdict |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(x) for x in (r["id"], r["probe"], r["sent"], r["statuses"], r["times_s"],
                                                         r["rss_mib"], r["verdict"])) + " |")
    return "\n".join(out)

def parse_args(argv=None)->argparse.Namespace:
    p = argparse.ArgumentParser(description="Attack a real `bankllm serve` on loopback; print a markdown table, write JSON.",
                                epilog="example: python tools/security_probe.py --label after --out benchmarks/security_probe_after.json")
    p.add_argument("--pythonpath", help="prepended to PYTHONPATH for the server subprocesses (e.g. a git worktree)")
    p.add_argument("--label", default="probe", help="a name for this run (e.g. before, after)")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--python", help="interpreter for the servers (default: this one)")
    p.add_argument("--data-dir", help="BANKLLM_DATA_DIR for the servers (default: $BANKLLM_DATA_DIR, else ../shared/data)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra setting for every server (repeatable; a probe's own settings still win)")
    p.add_argument("--only", type=lambda s: {int(x) for x in s.split(",")}, default=set(PROBES),
                   help="comma-separated probe numbers (default: all)")
    p.add_argument("--budget-s", type=float, default=660, help="stop starting probes after this many seconds (default 660)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folders (server logs, planted files)")
    return p.parse_args(argv)

def main(argv=None)->int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so `finally` blocks stop the servers
    ctx = Ctx(a); ctx.big_log = {"bytes": 0, "rounds": 0}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        info = ctx.discover()
        print(f"bankllm under test: {info['bankllm_file']} (commit {info['git_commit']}"
              f"{', with uncommitted changes' if info['package_has_uncommitted_changes'] else ''}); temp root {ctx.root}", flush=True)
        rows = run_all(ctx)
    finally:
        _kill_all()
        if not a.keep_tmp: shutil.rmtree(ctx.root, ignore_errors=True)
        else: print(f"kept {ctx.root}")
    md = markdown(rows, a.label)
    print("\n" + md)
    if ctx.notes: print("\nnotes:\n" + "\n".join(f"- {n}" for n in ctx.notes))
    if a.out:
        doc = dict(label=a.label, started_at=started, seconds=round(ctx.elapsed(), 1), pythonpath=a.pythonpath, **info,
                   python=ctx.python, cpus=os.cpu_count(), default_settings=DEFAULT_SETTINGS, server_env=ctx.overrides,
                   data_dir=ctx.data_dir, notes=ctx.notes, rows=rows, markdown=md)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(_portable(json.dumps(doc, indent=2, default=str)) + "\n")
        print(f"\nwrote {a.out}")
    return 0

def _portable(text:str)->str:
    "The report without this machine's folders: paths relative to the repository (or its parent)"
    return text.replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")

if __name__ == "__main__":
    sys.exit(main())
