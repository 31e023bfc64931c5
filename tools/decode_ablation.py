"""What each change to `BankingLLM.decode_step` buys: cumulative variants timed side by side (the table in 07a_fast_decoding).

    BANKLLM_DATA_DIR=... python tools/decode_ablation.py [--runs 6] [--json OUT.json]

Every variant decodes the same 255 greedy steps after the same prompt with the shipped model on one thread;
runs are interleaved (variant 1, 2, ..., 1, 2, ...) and the best run of each is kept. Each variant must produce
the recompute's tokens, or the script fails. Rows:

0. `forward` with a cache and one token;
1. the fast path as of the previous release: fused `(in, out)` weights with the norm gains folded in,
   `F.rms_norm`, RoPE by flip and `addcmul`, `scaled_dot_product_attention`, residuals in `torch.addmm`;
2. + RMSNorm's scale applied after the product (`torch.addmm` for x·x + C·eps, `rsqrt_`, √C in the matrix);
3. `decode_step` as exported: + attention as two `torch.bmm` and a softmax, 1/√hd folded into the query columns.
"""
import argparse, json, math, time

import torch
import torch.nn.functional as F

from bankllm.data import format_prompt
from bankllm.training import load_checkpoint
from bankllm.transformer import _inv_rms

QUESTION = "I need to dispute a withdrawal at an ATM that did not give me cash"


def old_weights(m):
    "Variant 1's weights: fused and transposed, norm gains folded, nothing else"
    layers = []
    for b in m.layers:
        a, f = b.self_attn, b.mlp
        qkv = torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)) * b.input_layernorm.weight
        gu = torch.cat((f.gate_proj.weight, f.up_proj.weight)) * b.post_attention_layernorm.weight
        layers.append(tuple(w.t().contiguous() for w in (qkv, a.o_proj.weight, gu, f.down_proj.weight)))
    return layers, (m.lm_head.weight * m.norm.weight).t().contiguous()


def variant(m, level):
    "Row 1 (`level=1`) or row 2 (`level=2`) of the table; row 3 is the exported `decode_step`"
    c, dw = m.config, m.decode_weights()
    C, nh, nkv, hd, ffn, eps, nqk = c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.ffn_dim, c.norm_eps, c.n_head + c.n_kv_head
    layers, head = old_weights(m) if level == 1 else (None, None)
    if level == 2:  # the new weights but without 1/sqrt(hd) in the query columns
        scale = torch.ones(dw.layers[0][0].shape[1]); scale[:nh * hd] = math.sqrt(hd)
        layers, head = [(q * scale, o, gu, d) for q, o, gu, d in dw.layers], dw.head
    def norm_mm(x, w):
        return F.rms_norm(x, (C,), eps=eps) @ w if level == 1 else (x @ w).mul_(_inv_rms(x, dw.c_eps))
    def step(tok, cache, pos):
        cos, sin = dw.rope_cos[pos], dw.rope_sin[pos]
        x = m.tok_embeddings.weight[tok].view(1, C)
        for i, (w_qkv, w_o, w_gu, w_down) in enumerate(layers):
            qkv = norm_mm(x, w_qkv)
            qk = qkv[0, :nqk * hd].view(nqk, hd)
            qk = torch.addcmul(qk * cos, qk.view(nqk, 2, hd // 2).flip(1).view(nqk, hd), sin)
            ck, cv = cache.k[i][0], cache.v[i][0]
            ck[:, pos] = qk[nh:]
            cv[:, pos] = qkv[0, nqk * hd:].view(nkv, hd)
            y = F.scaled_dot_product_attention(qk[:nh].view(1, nh, 1, hd), ck[None, :, :pos + 1],
                                               cv[None, :, :pos + 1], enable_gqa=nh != nkv)
            x = torch.addmm(x, y.reshape(1, C), w_o)
            gu = norm_mm(x, w_gu)
            x = torch.addmm(x, F.silu(gu[:, :ffn]) * gu[:, ffn:], w_down)
        cache.length = pos + 1
        return norm_mm(x, head).view(-1)
    return step


@torch.inference_mode()
def decode(m, prompt, n, step):
    "Prefill with `forward`, then n-1 greedy steps through `step`; returns (token ids, seconds of the steps)"
    cache = m.new_cache()
    logits, ids, pos = m(torch.tensor([prompt]), cache=cache)[0][0, -1], [], len(prompt)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        ids.append(int(logits.argmax()))
        logits = step(ids[-1], cache, pos); pos += 1
    ids.append(int(logits.argmax()))
    return ids, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    m, tok = load_checkpoint()
    prompt = tok.encode(format_prompt(QUESTION))
    steps = {"forward with a cache, one token": lambda t, c, p: m(torch.tensor([[t]]), cache=c, start_pos=p)[0][0, -1],
             "previous fast path (F.rms_norm, SDPA)": variant(m, 1),
             "+ RMSNorm's scale after the product": variant(m, 2),
             "decode_step as exported (+ attention as two bmm)": lambda t, c, p, dw=m.decode_weights(): m.decode_step(t, c, p, dw)}
    want = m.generate(prompt, 256, temperature=0, use_cache=False).ids
    best = {k: float("inf") for k in steps}
    for _ in range(args.runs):
        for name, step in steps.items():
            ids, s = decode(m, prompt, 256, step)
            if ids != want: raise AssertionError(f"{name}: tokens differ from the recompute")
            best[name] = min(best[name], s)
    rows = [dict(variant=k, ms_per_token=round(v / 255 * 1e3, 3), tokens_per_s=round(255 / v, 1)) for k, v in best.items()]
    for r in rows: print(f"{r['variant']:<50} {r['ms_per_token']:>7.3f} ms/token  {r['tokens_per_s']:>7.1f} tok/s")
    if args.json:
        with open(args.json, "w") as f: json.dump(dict(rows=rows, runs=args.runs, torch=torch.__version__), f, indent=2)


if __name__ == "__main__": main()
