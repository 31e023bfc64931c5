"""The dev goals of each model with four-beam search (length penalty 2) and greedy, from one run.

    BANKLLM_DATA_DIR=... python tools/beam_search_goals.py OUT.json [MODEL ...]

MODEL: a custom checkpoint or a QLoRA adapter (`qlora_...`); default: the shipped custom model and QLoRA adapter.
Each is evaluated on the four dev sets (827 questions) by `evaluate_checkpoint` or `evaluate_adapter` with
`BANKLLM_NUM_BEAMS=4`, which adds the greedy row beside the 4-beam one; nothing is written beside the weights.
Writes `record_path(OUT.json)`: a scratch copy unless BANKLLM_UPDATE_SHIPPED=1. `07c_beam_search` reads the
shipped `benchmarks/beam_search_goals.json`.
"""
import asyncio, json, os, sys
from pathlib import Path

os.environ["BANKLLM_NUM_BEAMS"], os.environ["BANKLLM_LENGTH_PENALTY"] = "4", "2.0"

from bankllm.adapters.custom import evaluate_checkpoint
from bankllm.adapters.qlora import evaluate_adapter
from bankllm.config import record_path
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
        t = await (evaluate_adapter(m, save=False) if m.startswith("qlora_") else evaluate_checkpoint(m, save=False))
        runs[m] = rows(t)
        facts[m] = {k: v for k, v in t.attrs.items() if k in ("n", "seconds", "num_beams", "length_penalty", "max_tokens", "measured")}
        print(m, json.dumps(runs[m]), flush=True)
    path = record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(models=runs, facts=facts), indent=2) + "\n")
    print("wrote", path)

if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2:] or [SHIPPED_VERSION, SHIPPED_QLORA_VERSION]))
