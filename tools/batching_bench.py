"""Continuous batching, measured side by side in one run (the numbers `nbs/07b_batching.ipynb` shows).

    python tools/batching_bench.py benchmarks/batching_cpu.json --vllm-python ~/venvs/vllm/bin/python

1. The goal case: sixteen greedy questions to the custom adapter one after another, then all sixteen at once with
   continuous batching (`BANKLLM_MAX_BATCH=16`), and at once with one request at a time (`BANKLLM_MAX_BATCH=1`, the
   old behaviour); answers compared. Two alternating repetitions, the best of each kept. With the engine threads of
   `bankllm serve`, and again with one.
2. A concurrency sweep (1, 4, 16, 32 clients, back to back, 32 requests, 64 new tokens each, stop token ignored so
   every request is the same work), in float32 (the weights as shipped) and in bfloat16 (what vLLM casts a float32
   model to on a CPU by default): our `BatchScheduler` in-process, twice around vLLM (`tools/vllm_batching.py`, run
   with `--vllm-python`, on the same checkpoint exported as a Hugging Face folder, the same prompt token ids); the
   best of two runs per engine and concurrency. Ours with the engine threads of `bankllm serve` (one per core) and
   with one (the library's default).
3. Through the API: the app on uvicorn on loopback, `/v1/chat/completions` clients at the same concurrencies.
The process is laid out as `bankllm serve` lays out its own (`serving_config`, nbs/07b_batching section 5): this
thread's torch work on one thread, each engine thread the only OpenMP team while it runs.
Writes to `record_path(OUT)`: a scratch copy unless BANKLLM_UPDATE_SHIPPED=1.
"""
import argparse, asyncio, json, os, statistics, subprocess, tempfile, time
from pathlib import Path

import torch

QUESTIONS = [
    "How do I activate my new card?", "I want to close my savings account", "What are the fees for international transfers?",
    "my card got declined at the shop, why?", "Can I change my PIN at an ATM?", "how long does a transfer take",
    "I lost my card", "what is the exchange rate for euros", "Why was I charged a fee?",
    "How do I open an account for my child?", "the app says my top up failed", "can you help me with a mortgage",
    "I need to dispute a payment", "is there a limit on cash withdrawals", "how do I set up a direct debit",
    "I think someone used my card without permission", "where can I see my statement", "my salary has not arrived",
    "can I get a refund for a duplicate charge", "how do I add money with apple pay", "what documents do I need to verify my identity",
    "the ATM kept my card", "I forgot my password", "can I have a virtual card", "how do I order a new card",
    "why is my transfer pending", "I was charged twice for the same thing", "can I pay in another currency",
    "how do I update my address", "what is the daily spending limit", "is my money safe with you", "how do I cancel a transfer"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(engine, c, res, wall):
    "res: (latency_s, ttft_s, tokens) per request"
    lat, ttft, toks = [r[0] for r in res], [r[1] for r in res if r[1] is not None], sum(r[2] for r in res)
    return dict(engine=engine, concurrency=c, requests=len(res), tokens=toks, seconds=wall, tokens_per_s=toks / wall,
                requests_per_s=len(res) / wall, p50_latency_ms=1000 * statistics.median(lat),
                p99_latency_ms=1000 * pct(lat, 99), p50_ttft_ms=1000 * statistics.median(ttft) if ttft else None)


async def closed_loop(c, n, one):
    "c clients, each sending its next request when the last is answered, until n are answered"
    todo, res = list(range(n)), []
    async def client():
        while todo: res.append(await one(todo.pop(0)))
    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(c)])
    return res, time.perf_counter() - t0


async def goal_case(threads, reps=2, max_tokens=128):
    from bankllm.adapters.custom import CustomAdapter
    from bankllm.config import get_config
    qs = QUESTIONS[:16]
    best, texts = {}, {}
    async def run(a, mode):
        t0 = time.perf_counter()
        if mode == "one by one": rs = [await a.generate(q, max_tokens=max_tokens, temperature=0) for q in qs]
        else: rs = await asyncio.gather(*[a.generate(q, max_tokens=max_tokens, temperature=0) for q in qs])
        return time.perf_counter() - t0, rs
    for _ in range(reps):
        # one adapter loaded at a time: each engine thread is the process's only OpenMP team while it runs
        for max_batch, modes in [(16, ["one by one", "16 at once, batched"]), (1, ["16 at once, one at a time"])]:
            a = CustomAdapter(config=get_config(max_batch=max_batch, custom_threads=threads), fill_placeholders=False)
            await a.load()
            for mode in modes:
                st0 = a.batch_stats()
                s, rs = await run(a, mode)
                st = a.batch_stats()
                steps = st["steps"] - st0["steps"]
                tokens = sum(r.tokens for r in rs)
                texts[mode] = [r.text for r in rs]
                if mode not in best or s < best[mode]["seconds"]:
                    best[mode] = dict(mode=mode, seconds=round(s, 3), tokens=tokens, tokens_per_s=round(tokens / s, 1),
                                      mean_batch=round((st["rows_stepped"] - st0["rows_stepped"]) / steps, 2) if "batched" in mode else None)
            a.unload()
    base = best["one by one"]["tokens_per_s"]
    rows = [dict(r, vs_one_by_one=round(r["tokens_per_s"] / base, 2)) for r in best.values()]
    same = texts["16 at once, batched"] == texts["one by one"]
    print("goal", threads, json.dumps(rows), "same answers:", same, flush=True)
    return dict(threads=threads, rows=rows, same_answers=same, same_answers_one_at_a_time=texts["16 at once, one at a time"] == texts["one by one"],
                questions=len(qs), max_tokens=max_tokens, example=texts["16 at once, batched"][0])


async def ours_sweep(model, prompts, concurrency, n_requests, max_tokens, label, threads):
    from bankllm.batching import BatchScheduler, LoopInbox, SeqRequest
    sched = BatchScheduler(model, max_batch=max(concurrency), threads=threads)
    inbox = LoopInbox(asyncio.get_running_loop())  # as the custom adapter does
    ids = {}
    async def one(i):
        q, t0, ttft, out = asyncio.Queue(), time.perf_counter(), None, []
        sched.submit(SeqRequest(prompts[i % len(prompts)], max_tokens, inbox.sender(q)))
        while (x := await q.get()) is not None:
            if isinstance(x, BaseException): raise x
            ttft = ttft or time.perf_counter() - t0
            out.append(x[0])
        ids[i] = out
        return time.perf_counter() - t0, ttft, len(out)
    await one(0)
    rows, first_ids = [], None
    for c in concurrency:
        ids.clear()
        res, wall = await closed_loop(c, n_requests, one)
        rows.append(summary(f"bankllm {label}", c, res, wall))
        if c == 1: first_ids = dict(ids)
        print(json.dumps(rows[-1]), flush=True)
    rows[-1]["mean_batch_all_runs"] = sched.stats()["mean_batch"]
    sched.close()
    return rows, first_ids


def vllm_sweep(python, model, tok, prompts, concurrency, n_requests, max_tokens, dtype):
    from bankllm.training import export_hf
    with tempfile.TemporaryDirectory() as d:
        folder = export_hf(model, tok, Path(d)/"hf")
        job = Path(d)/"job.json"
        job.write_text(json.dumps(dict(prompts=prompts, max_tokens=max_tokens, concurrency=concurrency, requests=n_requests,
                                       dtype=dtype, repeats=2)))
        out = Path(d)/"out.json"
        t0 = time.perf_counter()
        p = subprocess.run([python, str(Path(__file__).with_name("vllm_batching.py")), str(folder), str(job), str(out)],
                           capture_output=True, text=True, timeout=1500, cwd=d)
        if not out.exists(): raise RuntimeError(f"vLLM run failed ({p.returncode}): {p.stderr[-3000:]}")
        r = json.loads(out.read_text())
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        return r


async def api_sweep(concurrency, n_requests, max_tokens, threads):
    import httpx
    from bankllm.adapters.custom import CustomAdapter
    from bankllm.app import create_app
    from bankllm.config import get_config
    from bankllm.pipeline import BankingLLMPipeline
    from bankllm.testing import LiveServer
    cfg = get_config(max_batch=max(concurrency), custom_threads=threads, max_queue=64, enable_benchmarking=False, fill_placeholders=False,
                     benchmark_log=Path(tempfile.mkdtemp())/"log.jsonl")
    rows = []
    with LiveServer(create_app(BankingLLMPipeline(cfg, model=CustomAdapter(config=cfg)))) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
            errors = []
            async def one(i):
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=dict(
                    model="custom", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    max_tokens=max_tokens, temperature=0))
                if r.status_code != 200: errors.append(r.status_code); return time.perf_counter() - t0, None, 0
                return time.perf_counter() - t0, None, r.json()["usage"]["completion_tokens"]
            await one(0)
            for c in concurrency:
                errors.clear()
                res, wall = await closed_loop(c, n_requests, one)
                rows.append(dict(summary("bankllm API float32", c, res, wall), errors=len(errors)))
                print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["p50_latency_ms"]
    for r in rows: r["p50_vs_concurrency_1"] = round(r["p50_latency_ms"] / base, 2)
    return rows


def best_of(*runs):
    "Per concurrency, the run with the most tokens/s"
    by = {}
    for run in runs:
        for r in run:
            if r["concurrency"] not in by or r["tokens_per_s"] > by[r["concurrency"]]["tokens_per_s"]: by[r["concurrency"]] = r
    return [by[c] for c in sorted(by)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--vllm-python", help="a Python that has vLLM (its own venv); without it the vLLM rows are skipped")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16,32")
    a = ap.parse_args()
    torch.set_num_threads(1)  # the process layout of `bankllm serve`: its own torch work on one thread, the engine takes the cores
    from bankllm.batching import serving_config
    from bankllm.config import get_config, record_path
    from bankllm.data import format_prompt
    from bankllm.training import SHIPPED_VERSION, load_checkpoint
    conc = [int(c) for c in a.concurrency.split(",")]
    model, tok = load_checkpoint(SHIPPED_VERSION)
    prompts = [tok.encode(format_prompt(q)) for q in QUESTIONS]
    out = dict(machine=dict(cpu_count=os.cpu_count(), torch=torch.__version__,
                            loadavg_start=os.getloadavg()),
               model=SHIPPED_VERSION, requests=a.requests, max_tokens=a.max_tokens, concurrency=conc)
    default = serving_config(get_config()).custom_threads  # the server's engine threads (`bankllm serve`)
    out["machine"]["serve_engine_threads"] = default
    out["goal"] = asyncio.run(goal_case(default))
    out["goal_1_thread"] = asyncio.run(goal_case(1))  # the library's default (a notebook, a process with other torch threads)
    bf16 = load_checkpoint(SHIPPED_VERSION)[0].to(torch.bfloat16)
    variants = {"float32": (model, default), "bfloat16": (bf16, default), "float32, 1 thread": (model, 1)}
    def ours():
        return {k: asyncio.run(ours_sweep(m, prompts, conc, a.requests, a.max_tokens, k, th)) for k, (m, th) in variants.items()}
    runs = [ours()]
    if a.vllm_python:
        out["vllm"] = {}
        for dt in ["float32", "bfloat16"]:
            v = vllm_sweep(a.vllm_python, model, tok, prompts, conc, a.requests, a.max_tokens, dt)
            ids = runs[0][dt][1]
            same = [v["ids_at_concurrency_1"].get(str(i)) == ids[i] for i in sorted(ids)]
            out["vllm"][dt] = dict(version=v["vllm"], startup_s=v["startup_s"], wall_s=v["wall_s"], rows=v["rows"],
                                   same_greedy_ids_as_ours_at_concurrency_1=f"{sum(same)}/{len(same)}")
        runs.append(ours())
    out["ours_runs"] = [{dt: rows for dt, (rows, _) in r.items()} for r in runs]
    out["sweep"] = [row for k in variants for row in best_of(*[r[k][0] for r in runs])]
    out["sweep"] += [row for v in out.get("vllm", {}).values() for row in v["rows"]]
    out["api"] = asyncio.run(api_sweep(conc, a.requests, a.max_tokens, default))
    out["sweep"] += out["api"]
    out["machine"]["loadavg_end"] = os.getloadavg()
    path = record_path(Path(a.out))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
