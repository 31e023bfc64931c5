"""Does robustness augmentation help? Two shortened runs of the shipped custom recipe, identical but for
`training_mix(augment=...)`, each scored by the quick topic check (greedy, 48 tokens) on the dev sets as written and
with every question perturbed (`perturb`: typos, lower case, no punctuation).

    BANKLLM_DATA_DIR=... python tools/augmentation_ablation.py benchmarks/augmentation_ablation.json [STEPS]

Writes JSON (numbers only, no data rows) that `nbs/07_training.ipynb` shows.
"""
import json, random, sys, time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bankllm.data import eval_sets, perturb
from bankllm.evaluation import default_classifier
from bankllm.training import SHIPPED_VERSION, RECIPES, quick_topic_accuracy, stratified_head, train_custom_model

OUT = Path(sys.argv[1])
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 1400

mc, tc, mix = RECIPES[SHIPPED_VERSION]
tc = replace(tc, steps=STEPS, eval_every=STEPS, time_limit_s=None)  # one dev check, at the end
ev = eval_sets("dev", scope_per_intent=2)
rng = random.Random(0)
base = {"real": ev["real"], "scope": ev["scope"], "bitext": stratified_head(ev["bitext"], 78)}
sets = {**base, **{f"{k}_perturbed": s.assign(question=[perturb(q, rng) for q in s.question]) for k, s in base.items()}}
clf = default_classifier()
res = dict(recipe=SHIPPED_VERSION, steps=STEPS, train_config=asdict(tc), sets={k: len(s) for k, s in sets.items()},
           threads=torch.get_num_threads(), runs={})
for augment in (False, True):
    t0 = time.perf_counter()
    model, tok, rec = train_custom_model(None, mc, tc, mix={**(mix or {}), "augment": augment}, progress=False)
    scores = {k: round(quick_topic_accuracy(model, tok, s, clf, 48), 4) for k, s in sets.items()}
    res["runs"]["with" if augment else "without"] = dict(
        augment=augment, train_rows=sum(rec["data"]["mix_rows"].values()), train_seconds=rec["train_seconds"],
        final_train_loss=rec["final_train_loss"], dev_loss=rec["best_dev_loss"], scores=scores,
        seconds=round(time.perf_counter() - t0, 1))
    print(augment, json.dumps(res["runs"]["with" if augment else "without"]), flush=True)
res["measured"] = time.strftime("%Y-%m-%d", time.gmtime())
OUT.write_text(json.dumps(res, indent=2) + "\n")
print("wrote", OUT)
