"""GPU measurements that CI cannot make (it has no GPU): run on a CUDA machine, results as JSON.

    BANKLLM_DATA_DIR=... python tools/gpu_bench.py OUT_DIR [--smoke]

1. QLoRA on CUDA: `finetune_qlora` with the shipped recipe (NF4 + double quantization, bf16 compute): steps/s,
   tokens/s, peak CUDA memory; the adapter is written to OUT_DIR/qlora_adapter.
2. The custom model's training on CUDA (bf16 autocast, torch.compile): the shipped recipe end to end (dev loss and
   topic accuracy as on CPU), then a batch-size sweep: steady-state tokens/s and model FLOPs utilisation.
3. A bigger (random-weight) Llama in 4 bits: weight memory NF4 vs bf16, QLoRA steps/s and peak memory.
`--smoke` shrinks everything to check the script on a CPU.
"""
import json, sys, time, traceback
from dataclasses import replace
from pathlib import Path

import torch

OUT = Path(sys.argv[1]); OUT.mkdir(parents=True, exist_ok=True)
SMOKE = "--smoke" in sys.argv
RESULTS: dict = {}

def save():
    (OUT/"gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str))

def part(name):
    "Run one measurement; record its error instead of losing the others"
    def wrap(f):
        t0 = time.perf_counter()
        try: RESULTS[name] = f()
        except Exception as e: RESULTS[name] = dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        RESULTS.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name} ({RESULTS['seconds'][name]} s)", json.dumps(RESULTS[name], default=str)[:3000], flush=True)
        save()
    return wrap

def peak_flops(device)->float|None:
    "Dense bf16 peak of the GPU (H100 SXM / H200: 989 TFLOP/s), None when unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return 989e12 if ("H100" in name or "H200" in name) else None

def env():
    import transformers, peft
    d = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
             cuda=torch.cuda.is_available())
    try:
        import bitsandbytes; d["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e: d["bitsandbytes"] = f"missing: {e}"
    if torch.cuda.is_available(): d["gpu"] = torch.cuda.get_device_name(0)
    return d
RESULTS["env"] = env(); print(RESULTS["env"], flush=True)

from bankllm.data import bitext_pairs
from bankllm.qlora import QLORA_RECIPES, QLoRAConfig, finetune_qlora, memory_table
from bankllm.training import (RECIPES, checkpoints_dir, make_examples,
                              pick_device, stratified_head, train)
from bankllm.evaluation import default_classifier
from bankllm.tokenizer import BPETokenizer
from bankllm.transformer import BankingLLM, ModelConfig, count_params

DEV = pick_device("auto")
SUMMARY = lambda rec: {k: rec[k] for k in ("steps", "train_seconds", "steps_per_s", "tokens_per_s", "trainable_params",
                                           "total_params", "final_train_loss", "final_dev_loss", "peak_cuda_memory_mb")}

@part("qlora_shipped_recipe")
def _():
    version = "qlora_vllm_finetuned_model_v1.0.0"  # the recipe measured in benchmarks/gpu_h200.json (Bitext, 0.0.0 base)
    base, cfg, _ = QLORA_RECIPES[version]
    cfg = replace(cfg, device=str(DEV), **(dict(steps=4, eval_every=2) if SMOKE else {}))
    out = OUT/"qlora_adapter"
    r = finetune_qlora(base, out, cfg, version=version, progress=False)
    return dict(SUMMARY(r.record), dev_losses=[round(h["dev_loss"], 4) for h in r.history if "dev_loss" in h])

@part("qlora_memory_custom")
def _(): return memory_table("custom_model_built_0.0.0", device=DEV).to_dict("records")

def steady_tokens_per_s(res, batch_tokens):
    "Tokens/s between the second and the last logged step (compilation and warm-up excluded)"
    h = [x for x in res.history if "loss" in x]
    if len(h) < 3: return None
    return batch_tokens * (h[-1]["step"] - h[1]["step"]) / (h[-1]["t"] - h[1]["t"])

@part("custom_training")
def _():
    ck = checkpoints_dir()/"custom_model_built_0.0.0"  # the Bitext-only recipe, as measured in benchmarks/gpu_h200.json
    SHIPPED_MODEL_CONFIG, SHIPPED_TRAIN_CONFIG, _ = RECIPES[ck.name]
    tok = BPETokenizer.load(ck/"tokenizer.json")
    tr, dv = bitext_pairs("train"), bitext_pairs("dev")
    mcfg = SHIPPED_MODEL_CONFIG if not SMOKE else ModelConfig.tiny()
    tr_ex, dv_ex = make_examples(tok, tr, mcfg.block_size), make_examples(tok, dv, mcfg.block_size)
    out, flops_peak = {}, peak_flops(DEV)
    # the shipped recipe end to end, with its dev evaluations (topic accuracy by greedy generation)
    tcfg = replace(SHIPPED_TRAIN_CONFIG, device=str(DEV), dtype="auto", time_limit_s=None,  # bf16 autocast on CUDA, as measured
                   **(dict(steps=30, eval_every=15, eval_questions=8) if SMOKE else {}))
    if SMOKE: mcfg = replace(mcfg, vocab_size=tok.vocab_size)
    torch.manual_seed(tcfg.seed); model = BankingLLM(mcfg)
    res = train(model, tok, tr_ex, dv_ex, tcfg, stratified_head(dv, tcfg.eval_questions), default_classifier(), False)
    out["shipped_recipe"] = dict(steps=res.steps, seconds=round(res.seconds, 1), tokens_per_s=round(res.tokens_per_s),
                                 best_step=res.best_step, best_dev_loss=round(res.best_dev_loss, 4),
                                 best_dev_topic=res.best_topic, evals=[h for h in res.history if "dev_loss" in h])
    # throughput sweep: loss-only training, no evaluation until the end
    n = count_params(model)
    for bs in ((16, 64, 256) if not SMOKE else (4,)):
        steps = 300 if not SMOKE else 60
        torch.manual_seed(0); m = BankingLLM(mcfg)
        r = train(m, tok, tr_ex, dv_ex[:64], replace(tcfg, batch_size=bs, steps=steps, eval_every=10**9), None, None, False)
        tps = steady_tokens_per_s(r, r.tokens / r.steps)
        seq = (r.tokens / r.steps) / bs
        flops_per_token = 6 * n + 12 * mcfg.n_layer * mcfg.n_embd * seq
        out[f"batch_{bs}"] = dict(steps=r.steps, seconds=round(r.seconds, 1), mean_seq_tokens=round(seq, 1),
                                  steady_tokens_per_s=round(tps) if tps else None,
                                  mfu=(tps * flops_per_token / flops_peak) if (tps and flops_peak) else None)
    out.update(params=n, flops_peak=flops_peak, compile=DEV.type == "cuda")
    return out

@part("qlora_bigger_base")
def _():
    from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
    from bankllm.qlora import resolve_base
    small = resolve_base("custom_model_built_0.0.0")
    dims = (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=8) if not SMOKE else
            dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    tok = AutoTokenizer.from_pretrained(small)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims)
    torch.manual_seed(0)
    big = Path("/tmp/bankllm_big_llama"); LlamaForCausalLM(cfg).save_pretrained(big); tok.save_pretrained(big)
    mem = memory_table(big, device=DEV)
    qcfg = QLoRAConfig(steps=40 if not SMOKE else 3, batch_size=16, eval_every=10**9, device=str(DEV),
                       gradient_checkpointing=True)
    tr = bitext_pairs("train").sample(1000, random_state=0); dv = bitext_pairs("dev").head(32)
    r = finetune_qlora(big, "/tmp/bankllm_big_adapter", qcfg, tr, dv, progress=False)
    return dict(llama_dims=dims, memory=mem.to_dict("records"), quantized_weights=mem.attrs["quantized_weights"],
                qlora=SUMMARY(r.record), note="random weights: speed and memory only, the loss means nothing")

print(json.dumps({k: v for k, v in RESULTS.items()}, default=str)[:6000])
