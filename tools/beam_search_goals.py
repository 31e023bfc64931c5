"""The dev goals of each model with four-beam search (length penalty 2, the hand-off guard on) and greedy, from one run.

    BANKLLM_DATA_DIR=... python tools/beam_search_goals.py OUT.json [MODEL ...]
    BANKLLM_DATA_DIR=... python tools/beam_search_goals.py --no-guard OUT.json [MODEL ...]

MODEL: a custom checkpoint or a QLoRA adapter (`qlora_...`); default: the shipped custom model and QLoRA adapter.
Each is evaluated on the four dev sets (827 questions) by `evaluate_checkpoint` or `evaluate_adapter` with
`BANKLLM_NUM_BEAMS=4` (the default), which adds the greedy row beside the 4-beam one: the model's `dev_quality.json`.
Writes it and `record_path(OUT.json)`: scratch copies unless BANKLLM_UPDATE_SHIPPED=1. `07c_beam_search` reads the
shipped `benchmarks/beam_search_goals.json`.
`--no-guard` adds to OUT.json a third row per model: four beams with `beam_handoff_guard` off, what the guard changes.
"""
import asyncio, json, os, sys
from pathlib import Path

os.environ.update(BANKLLM_NUM_BEAMS="4", BANKLLM_LENGTH_PENALTY="2.0", BANKLLM_BEAM_HANDOFF_GUARD="true")

from beam_search_bench import adapter_for  # tools/: the same adapters, a setting each
from bankllm.adapters.custom import evaluate_checkpoint
from bankllm.adapters.qlora import evaluate_adapter
from bankllm.config import record_path
from bankllm.evaluation import dev_goals
from bankllm.qlora import SHIPPED_QLORA_VERSION
from bankllm.training import SHIPPED_VERSION

def rows(table)->list[dict]:
    "The model's two rows, labelled by how they were decoded"
    named = {r["name"]: r for r in table.to_dict("records")}
    v = table.name.iloc[0]
    return [named[v] | {"decoding": "4 beams"}, named[f"{v}, greedy"] | {"decoding": "greedy"}]

async def main(out:Path, models:list[str]):
    runs, facts = {}, {}
    for m in models:
        t = await (evaluate_adapter(m) if m.startswith("qlora_") else evaluate_checkpoint(m))
        runs[m] = rows(t)
        facts[m] = {k: v for k, v in t.attrs.items() if k in ("n", "seconds", "num_beams", "length_penalty", "max_tokens", "measured")}
        print(m, json.dumps(runs[m]), flush=True)
    path = record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(models=runs, facts=facts), indent=2) + "\n")
    print("wrote", path)

async def no_guard(out:Path, models:list[str]):
    "Four beams with the guard off, on the same dev sets, added to the record `main` wrote"
    path = record_path(out)
    rec = json.loads(path.read_text())
    for m in models:
        a = adapter_for(m, 4, 2.0, guard=False)
        t = await dev_goals(a, baselines=False, greedy=False, concurrency=16)
        a.unload()
        row = t.to_dict("records")[0] | {"decoding": "4 beams, no guard"}
        rec["models"][m] = [r for r in rec["models"][m] if r["decoding"] != row["decoding"]] + [row]
        print(m, json.dumps(row), flush=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print("wrote", path)

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-guard"]
    run = no_guard if "--no-guard" in sys.argv else main
    asyncio.run(run(Path(args[0]), args[1:] or [SHIPPED_VERSION, SHIPPED_QLORA_VERSION]))
