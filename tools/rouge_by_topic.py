"""Where a checkpoint's ROUGE-L on Bitext dev comes from: precision, recall, length, and right- against wrong-topic answers.

    BANKLLM_DATA_DIR=... python tools/rouge_by_topic.py OUT.json NAME=CHECKPOINT [NAME=CHECKPOINT ...]

Each checkpoint (a shipped name or a folder) answers the 384 Bitext dev questions greedily (the default `max_tokens`
setting, the custom adapter with placeholders left in, as `evaluate_checkpoint` does). Writes `record_path(OUT.json)`: a scratch copy
unless BANKLLM_UPDATE_SHIPPED=1. `07_training` reads the shipped `benchmarks/rouge_by_topic.json`.
"""
import asyncio, json, os, sys, time
from pathlib import Path

os.environ.setdefault("BANKLLM_NUM_BEAMS", "1")  # greedy, as the recipe records were measured (07c_beam_search)

from bankllm.adapters.custom import CustomAdapter
from bankllm.config import get_config, record_path
from bankllm.data import eval_sets
from bankllm.evaluation import default_classifier, evaluate, lcs_length, word_tokens
from bankllm.training import resolve_checkpoint

def split(rows, refs)->dict:
    "ROUGE-L of `rows`' answers against `refs`, with its precision, recall and length, and by right or wrong topic"
    cand, ref = [word_tokens(a) for a in rows.answer], [word_tokens(a) for a in refs]
    lcs = [lcs_length(c, r) for c, r in zip(cand, ref)]
    right = rows.correct.astype(bool).to_numpy()
    mean = lambda xs: float(sum(xs) / len(xs)) if len(xs) else None
    return dict(rouge_l=mean(rows.rouge_l), precision=mean([x / len(c) if c else 0.0 for x, c in zip(lcs, cand)]),
                recall=mean([x / len(r) for x, r in zip(lcs, ref)]), words=mean([len(c) for c in cand]),
                rouge_l_right_topic=mean(rows.rouge_l[right].tolist()), rouge_l_wrong_topic=mean(rows.rouge_l[~right].tolist()),
                wrong_topic=int((~right).sum()), n=len(rows))

async def main(out:Path, named:dict[str, str]):
    clf, bitext = default_classifier(), eval_sets("dev")["bitext"]
    runs, max_tokens = {}, get_config().default_max_tokens
    for name, ck in named.items():
        d = resolve_checkpoint(ck)
        rep = await evaluate(CustomAdapter(d.name, checkpoint=d, fill_placeholders=False), bitext, clf, max_tokens, concurrency=16)
        runs[name] = split(rep.rows.reset_index(drop=True), bitext.answer.reset_index(drop=True))
        print(name, json.dumps(runs[name]), flush=True)
    path = record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(measured=time.strftime("%Y-%m-%d"), max_tokens=max_tokens,
                                    reference_words=sum(len(word_tokens(a)) for a in bitext.answer) / len(bitext), runs=runs),
                               indent=2) + "\n")
    print("wrote", path)

if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:])))
