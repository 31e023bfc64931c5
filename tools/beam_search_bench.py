"""What beam search buys and what it costs, against greedy decoding, for each model: Bitext dev ROUGE-L and topic, length, time.
With and without the hand-off guard (`beam_handoff_guard`), at 4 beams and length penalty 2.

    BANKLLM_DATA_DIR=... python tools/beam_search_bench.py OUT.json NAME=MODEL [NAME=MODEL ...]

MODEL is a custom checkpoint (a shipped name or a folder) or a QLoRA adapter (a shipped name starting with `qlora_`,
served by the transformers engine). Each (beams, length_penalty) of the grid answers the 384 Bitext dev questions
through the model's adapter: 16 in flight, the default `max_tokens` setting, placeholders left in (as
`evaluate_checkpoint` does). ROUGE-L is reported on all questions and on the even and odd rows, so a setting
chosen on one half can be checked on the other. Writes `record_path(OUT.json)`: a scratch copy unless
BANKLLM_UPDATE_SHIPPED=1. `07c_beam_search` reads the shipped `benchmarks/beam_search.json`.
"""
import asyncio, json, sys, time
from pathlib import Path

import torch

from bankllm.adapters.custom import CustomAdapter
from bankllm.adapters.qlora import QLoRAAdapter
from bankllm.config import get_config, record_path
from bankllm.data import eval_sets
from bankllm.evaluation import default_classifier, evaluate, word_tokens
from bankllm.qlora import adapter_dir
from bankllm.training import resolve_checkpoint

# (beams, length_penalty, beam_handoff_guard)
CUSTOM_GRID = [(1, 0.0, True), (2, 2.0, True), (4, 0.0, True), (4, 1.0, True), (4, 2.0, True), (4, 2.0, False), (8, 2.0, True)]
QLORA_GRID = [(1, 0.0, True), (4, 1.0, True), (4, 2.0, True), (4, 2.0, False)]  # its engine is slower on a CPU: what matters

def adapter_for(model:str, beams:int, alpha:float, guard:bool=True):
    cfg = get_config().model_copy(update=dict(num_beams=beams, length_penalty=alpha, beam_handoff_guard=guard))
    if model.startswith("qlora_"):
        cfg = cfg.model_copy(update=dict(qlora_adapter=str(adapter_dir(model))))
        return QLoRAAdapter(model, config=cfg, engine="transformers", fill_placeholders=False)
    d = resolve_checkpoint(model)
    return CustomAdapter(d.name, checkpoint=d, config=cfg, fill_placeholders=False)

async def main(out:Path, named:dict[str, str]):
    clf, bitext = default_classifier(), eval_sets("dev")["bitext"].reset_index(drop=True)
    cfg, runs = get_config(), {}
    for name, model in named.items():
        grid = QLORA_GRID if model.startswith("qlora_") else CUSTOM_GRID
        for beams, alpha, guard in grid:
            a = adapter_for(model, beams, alpha, guard)
            t0 = time.perf_counter()
            rep = await evaluate(a, bitext, clf, cfg.default_max_tokens, concurrency=16)
            secs = time.perf_counter() - t0
            r = rep.rows.reset_index(drop=True)
            row = dict(model=name, beams=beams, length_penalty=alpha, guard=guard, rouge_l=float(r.rouge_l.mean()),
                       rouge_l_even=float(r.rouge_l[::2].mean()), rouge_l_odd=float(r.rouge_l[1::2].mean()),
                       topic=float(r.correct.mean()), stop_share=float((r.finish_reason == "stop").mean()),
                       words=float(r.answer.map(lambda s: len(word_tokens(s))).mean()),
                       seconds=round(secs, 1), answers_per_s=round(len(r) / secs, 2), errors=rep.errors)
            runs.setdefault(name, []).append(row)
            print(json.dumps(row), flush=True)
            a.unload()  # its engine thread and weights go before the next setting loads its own
    path = record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(measured=time.strftime("%Y-%m-%d"), max_tokens=cfg.default_max_tokens, concurrency=16,
                                    torch=torch.__version__, threads=cfg.custom_threads, runs=runs), indent=2) + "\n")
    print("wrote", path)

if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:])))
