"""What a QLoRA adapter can teach a frozen base: the 0.1.0 training mix taught to `custom_model_built_0.0.0`.

The shipped adapter `qlora_vllm_finetuned_model_v1.1.0` learns the 0.1.0 mix on top of the 0.1.0 model, which has
already learned that very mix: it has little left to learn, and its dev losses barely move. This script shows the
adapter's effect where there is something to learn: the same recipe on the 0.0.0 base, which saw only Bitext (no
real phrasing, no scope answer, no follow-ups). It trains that adapter (into the cache, not shipped), evaluates it on
the four dev sets exactly as the shipped models are evaluated (`dev_goals`), and quotes answers before (the base
alone) and after. Writes `benchmarks/qlora_effect.json`, which notebook 08 shows. About 30 minutes on two CPU cores.

    BANKLLM_DATA_DIR=../shared/data python tools/qlora_effect.py [--steps N]
"""
import argparse, asyncio, json, time
from dataclasses import asdict, replace
from pathlib import Path

from bankllm.adapters.custom import CustomAdapter, stored_quality
from bankllm.adapters.qlora import QLoRAAdapter
from bankllm.config import get_config
from bankllm.data import eval_sets
from bankllm.evaluation import dev_goals
from bankllm.qlora import QLORA_RECIPES, finetune_qlora, recipe_data

BASE, RECIPE = "custom_model_built_0.0.0", "qlora_vllm_finetuned_model_v1.1.0"
NAME = "qlora_effect_v0.0.0"  # a version string for the adapter contract; never shipped
QUOTES = 5                    # real-phrasing dev questions quoted before and after


async def main(steps:int|None, out:Path):
    _, cfg, mix = QLORA_RECIPES[RECIPE]
    cfg = replace(cfg, max_len=320, **({"steps": steps} if steps else {}))  # 0.0.0's context is 320 tokens
    train, dev = recipe_data(mix, seed=cfg.seed)
    adir = Path(get_config().cache_dir).expanduser()/"adapters"/NAME
    t0 = time.perf_counter()
    res = finetune_qlora(BASE, adir, cfg, train, dev, version=NAME, progress=False)
    print(f"trained in {res.record['train_seconds']} s; dev loss by set {res.record['dev_loss_by_set']}", flush=True)
    qa = QLoRAAdapter(NAME, config=get_config(qlora_adapter=str(adir)), engine="transformers", fill_placeholders=False)
    after = await dev_goals(qa, baselines=False)
    before = stored_quality(BASE).iloc[[0]]  # the base's own stored dev evaluation (the custom engine, same weights)
    real = eval_sets("dev")["real"].sample(QUOTES, random_state=1)
    base = CustomAdapter(BASE, fill_placeholders=False)
    quotes = []
    for q in real.question:
        b = await base.generate(q, max_tokens=120, temperature=0.0)
        a = await qa.generate(q, max_tokens=120, temperature=0.0)
        quotes.append(dict(question=q, before=b.text, after=a.text))
    cols = [c for c in after.columns if c != "name"]
    result = dict(
        base=BASE, recipe=RECIPE, config=asdict(cfg), measured=time.strftime("%Y-%m-%d"),
        train_seconds=res.record["train_seconds"], total_seconds=round(time.perf_counter() - t0, 1),
        trainable_params=res.record["trainable_params"], total_params=res.record["total_params"],
        hardware=res.record["hardware"], dev_loss_by_set=res.record["dev_loss_by_set"],
        goals={"before": before[cols].iloc[0].to_dict(), "after": after[cols].iloc[0].to_dict()},
        auroc_real={"before": before.attrs.get("auroc_real"), "after": after.attrs.get("auroc_real")},
        quotes=quotes)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: result[k] for k in ("dev_loss_by_set", "goals")}, indent=1, default=float))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]/"benchmarks"/"qlora_effect.json")
    a = ap.parse_args()
    asyncio.run(main(a.steps, a.out))
