"""Concurrent answers sharing forward passes in the QLoRA transformers engine: 1 at a time against 8 and 16 at once.

    BANKLLM_DATA_DIR=... python tools/qlora_batching.py [--rounds 3] [--max-tokens 32]
    BANKLLM_UPDATE_SHIPPED=1 python tools/qlora_batching.py     # write the shipped benchmarks/qlora_batching.json

The shipped adapter (`SHIPPED_QLORA_VERSION`) on its base, served in-process by `QLoRAAdapter` (the transformers
engine, CPU, its driver thread on `BANKLLM_QLORA_THREADS` torch threads, 1 by default), answers the same 16
questions greedily with `max_tokens` each, in every mode of one run: one request at a time; 8 at a time; all 16 at
once; and all 16 at once with `max_batch=1` (one row: what concurrent clients got before the engine batched). Modes
are interleaved round by round and the best round of each is kept. Every mode's answers are compared with the
one-at-a-time answers, token for token. Done twice: base in 4-bit NF4 (as served) and in full precision (float32).

Without `BANKLLM_UPDATE_SHIPPED=1` the JSON goes to a scratch copy (`bankllm.config.record_path`), never over the
shipped record.
"""
import argparse, asyncio, json, os, platform, statistics, time
from pathlib import Path

import torch

from bankllm.adapters.qlora import QLoRAAdapter
from bankllm.config import get_config, record_path
from bankllm.qlora import SHIPPED_QLORA_VERSION

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [  # 16 questions of different lengths, in the shipped adapter's topics and beside them
    "How can I activate my new card?", "I want to close my savings account", "What are the fees for international transfers?",
    "My card was stolen, what do I do?", "How do I apply for a mortgage?", "Can I change my PIN online?",
    "I need to dispute a withdrawal at an ATM that did not give me cash", "hi",
    "how long does a transfer to another bank take", "I lost my wallet with both of my cards in it yesterday evening",
    "Is there a fee for using my card abroad?", "I'd like to open a joint account with my partner",
    "why was my payment declined", "Can you recommend a good restaurant near the branch?",
    "How do I set up a standing order for my rent every month on the first?", "what's the interest rate on a personal loan",
]
MODES = [("1 at a time", 1, None), ("8 at once", 8, None), ("16 at once", 16, None), ("16 at once, max_batch=1", 16, 1)]


async def run_mode(qa, concurrency:int, max_tokens:int)->dict:
    "All QUESTIONS from `concurrency` clients, each sending its next question when answered; latency and TTFT from sending"
    sem, out = asyncio.Semaphore(concurrency), [None] * len(QUESTIONS)
    async def one(i):
        async with sem:  # a client free to send: the request leaves now
            t0, first, parts = time.perf_counter(), None, []
            async for d in qa.stream(QUESTIONS[i], max_tokens=max_tokens, temperature=0):
                first = first or time.perf_counter(); parts.append(d)
            r = qa.last_stream_result  # this answer's: set as its stream ended, before any other task ran
            out[i] = dict(text="".join(parts), tokens=r.tokens, latency_ms=(time.perf_counter() - t0) * 1e3,
                          ttft_ms=(first - t0) * 1e3 if first else None)
    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(len(QUESTIONS))])
    return dict(wall_s=time.perf_counter() - t0, answers=out)


def pct(xs, q): return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1], 1)


def summary(name, concurrency, max_batch, best, ref, stats)->dict:
    a = best["answers"]
    lat, ttft, toks = [x["latency_ms"] for x in a], [x["ttft_ms"] for x in a if x["ttft_ms"] is not None], sum(x["tokens"] for x in a)
    return dict(mode=name, concurrency=concurrency, max_batch=max_batch, requests=len(a), tokens=toks,
                wall_s=round(best["wall_s"], 3), tokens_per_s=round(toks / best["wall_s"], 1),
                requests_per_s=round(len(a) / best["wall_s"], 2), p50_ms=pct(lat, 50), p99_ms=pct(lat, 99),
                ttft_p50_ms=pct(ttft, 50), same_answers=sum(x["text"] == y["text"] for x, y in zip(a, ref)),
                rows_per_step=stats.get("rows_per_step"))


async def sweep(four_bit:bool, rounds:int, max_tokens:int)->dict:
    cfg = get_config(qlora_engine="transformers", qlora_load_in_4bit=four_bit, device="cpu", max_queue=64)
    qas = {mb: QLoRAAdapter(SHIPPED_QLORA_VERSION, cfg.model_copy(update=dict(qlora_max_batch=mb or 16))) for mb in (None, 1)}
    for qa in qas.values(): await qa.generate("warm up", max_tokens=4, temperature=0)
    best, stats = {}, {}
    for _ in range(rounds):
        for name, conc, mb in MODES:
            eng = qas[mb]._impl
            eng.counts.update(prefills=0, steps=0, row_steps=0, most_rows=0)
            r = await run_mode(qas[mb], conc, max_tokens)
            if name not in best or r["wall_s"] < best[name]["wall_s"]: best[name], stats[name] = r, eng.batch_stats()
    ref = best["1 at a time"]["answers"]
    rows = [summary(n, c, mb or 16, best[n], ref, stats[n]) for n, c, mb in MODES]
    base = rows[0]["tokens_per_s"]
    for r in rows: r["speedup"] = round(r["tokens_per_s"] / base, 2)
    return dict(base_4bit=qas[None]._impl.quantized, rows=rows,
                example=dict(question=QUESTIONS[0], answer=ref[0]["text"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    res = dict(adapter=SHIPPED_QLORA_VERSION, engine="transformers", device="cpu", questions=len(QUESTIONS),
               max_tokens=args.max_tokens, greedy=True, rounds=args.rounds, torch=torch.__version__,
               torch_threads=torch.get_num_threads(), driver_threads=get_config().qlora_threads, cpus=os.cpu_count(), machine=platform.machine(),
               measured=time.strftime("%Y-%m-%d"))
    for label, four_bit in (("nf4", True), ("fp32", False)):
        res[label] = asyncio.run(sweep(four_bit, args.rounds, args.max_tokens))
        print(f"\nbase {label}")
        for r in res[label]["rows"]:
            print(f"{r['mode']:<26} {r['tokens_per_s']:>7.1f} tok/s  x{r['speedup']:<5} p50 {r['p50_ms']:>7.1f} ms  "
                  f"p99 {r['p99_ms']:>7.1f} ms  TTFT p50 {r['ttft_p50_ms']:>6.1f} ms  same {r['same_answers']}/{r['requests']}  "
                  f"rows/step {r['rows_per_step']}")
    out = record_path(ROOT/"benchmarks"/"qlora_batching.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print("\nwrote", out.relative_to(ROOT) if out.is_relative_to(ROOT) else out.name)


if __name__ == "__main__": main()
