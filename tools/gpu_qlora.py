"""QLoRA adapter recipes trained on a CUDA machine (CI has none), each packed with its training record.

    BANKLLM_DATA_DIR=... python tools/gpu_qlora.py OUT_DIR VERSION[:field=value,...] ...

For each argument: `finetune_recipe(VERSION)` on CUDA with the `QLoRAConfig` fields given after the colon
changed (e.g. `qlora_vllm_finetuned_model_v1.2.0:lr=3e-3,steps=1200`), then the adapter folder
(weights, `adapter_config.json`, `training.json`) is packed as OUT_DIR/<VERSION>[-<n>].tar, and a summary of
every run (time, dev loss by set with the adapter off and on) goes to OUT_DIR/gpu_qlora.json.
Measure the dev goals of the adapter you keep on the machine that serves it (`evaluate_adapter`).
"""
import json, shutil, sys, tarfile, time, traceback
from pathlib import Path

import torch

from bankllm.qlora import QLORA_RECIPES, finetune_recipe

OUT = Path(sys.argv[1]); OUT.mkdir(parents=True, exist_ok=True)
RESULTS: dict = dict(torch=torch.__version__, cuda=torch.cuda.is_available(),
                     gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, runs=[])

def parse(arg:str)->tuple[str, dict]:
    "`VERSION:field=value,...` -> (version, overrides); values are read as JSON where they parse, else kept as text"
    version, _, rest = arg.partition(":")
    if version not in QLORA_RECIPES: raise SystemExit(f"no recipe {version!r}: known are {', '.join(QLORA_RECIPES)}")
    def value(v):
        try: return json.loads(v)
        except json.JSONDecodeError: return v
    return version, {k: value(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}

for i, arg in enumerate(sys.argv[2:]):
    version, overrides = parse(arg)
    name = version if not overrides else f"{version}-{i}"
    t0 = time.perf_counter()
    try:
        res = finetune_recipe(version, OUT/name, progress=False, **overrides)
        rec = res.record
        run = dict(name=name, version=version, overrides=overrides, train_seconds=rec["train_seconds"],
                   steps_per_s=rec["steps_per_s"], final_train_loss=round(rec["final_train_loss"], 4),
                   dev_loss_by_set=rec["dev_loss_by_set"], peak_cuda_memory_mb=rec["peak_cuda_memory_mb"])
        with tarfile.open(OUT/f"{name}.tar", "w") as t: t.add(OUT/name, arcname=name)
        shutil.rmtree(OUT/name)  # one file per run comes back
    except Exception as e:
        run = dict(name=name, version=version, overrides=overrides, error=f"{type(e).__name__}: {e}",
                   trace=traceback.format_exc()[-2000:])
    run["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS["runs"].append(run)
    print(json.dumps(run), flush=True)
    (OUT/"gpu_qlora.json").write_text(json.dumps(RESULTS, indent=2))
