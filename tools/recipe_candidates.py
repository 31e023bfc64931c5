"""Candidate checkpoints of one version, side by side: how each trained and what it scores on the dev sets.

    BANKLLM_DATA_DIR=... python tools/recipe_candidates.py OUT.json NAME=CHECKPOINT_FOLDER [NAME=FOLDER ...]

Each folder is a checkpoint written by `train_custom_model` (e.g. one recipe variant each); each is evaluated with
`evaluate_checkpoint` (greedy, the four dev sets, nothing saved beside it), and its `bitext_fit` (loss on Bitext
training chats against dev chats) is recorded beside. Writes `record_path(OUT.json)`: a
scratch copy unless BANKLLM_UPDATE_SHIPPED=1. `07_training` reads the shipped `benchmarks/recipe_0.2.0.json`,
`recipe_answer_cap.json` and `recipe_dropout.json`.
"""
import asyncio, json, os, sys, time
from pathlib import Path

os.environ.setdefault("BANKLLM_NUM_BEAMS", "1")  # greedy, as the recipe records were measured (07c_beam_search)

from bankllm.adapters.custom import evaluate_checkpoint
from bankllm.config import record_path
from bankllm.training import bitext_fit

TRAINING = ["steps", "train_seconds", "total_seconds", "tokens_per_s", "best_step", "best_dev_loss", "best_dev_topic_accuracy"]

async def main(out:Path, named:dict[str, Path]):
    runs = {}
    for name, folder in named.items():
        rec = json.loads((folder/"training.json").read_text())
        table = await evaluate_checkpoint(folder, save=False)
        runs[name] = dict(train_config={k: rec["train_config"].get(k) for k in ("steps", "batch_size", "eval_every", "time_limit_s", "seed")},
                          dropout=rec["model_config"].get("dropout", 0.0),
                          mix=rec["data"].get("mix"), training={k: rec[k] for k in TRAINING},
                          dev=table.iloc[0].drop(["name"]).to_dict(), auroc_real=table.attrs.get("auroc_real"),
                          bitext_fit=bitext_fit(folder))
        print(name, json.dumps(runs[name]["dev"]), flush=True)
    path = record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(measured=time.strftime("%Y-%m-%d"), runs=runs), indent=2, default=float) + "\n")
    print("wrote", path)

if __name__ == "__main__":
    named = dict(a.split("=", 1) for a in sys.argv[2:])
    asyncio.run(main(Path(sys.argv[1]), {k: Path(v) for k, v in named.items()}))
