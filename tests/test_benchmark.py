"bankllm.benchmark: honest tails, statuses, quality, JSONL under concurrency and crashes, files, overhead. No timing gates."
import json, multiprocessing as mp

import matplotlib
matplotlib.use("Agg")

from bankllm.testing import EchoAdapter
from bankllm.benchmark import (BenchmarkSuite, benchmark_model, concurrency_sweep, format_table, paired_latency,
                               results_frame, run_benchmark, summarize_rounds)
from bankllm.pipeline import pipeline_overhead
from bankllm.records import P99_MIN_SAMPLES, append_jsonl, latency_stats, read_jsonl

def test_p99_only_from_enough_samples():
    few = latency_stats(range(1, P99_MIN_SAMPLES))             # 99 samples
    assert few["latency_p99_ms"] is None and few["tail_label"] == "max" and few["latency_tail_ms"] == 99
    many = latency_stats(range(1, P99_MIN_SAMPLES+1))          # 100 samples
    assert many["tail_label"] == "p99" and many["latency_tail_ms"] == many["latency_p99_ms"] < 100
    assert latency_stats([None, 5.0])["n"] == 1 and latency_stats([])["tail_label"] == "max"

def test_table_labels_the_tail_honestly():
    recs = [{"model_version": "small", "status": "ok", "reason": None, "errors": 0, **latency_stats([1.0, 2.0, 3.0]),
             "ttft_p50_ms": 1.0, "tokens_per_s": 10.0, "topic_accuracy": 0.5, "rouge_l": 0.2, "quality_n": 3},
            {"model_version": "big", "status": "ok", "reason": None, "errors": 0, **latency_stats(range(1, 201)),
             "ttft_p50_ms": 1.0, "tokens_per_s": 10.0, "topic_accuracy": 0.9, "rouge_l": 0.4, "quality_n": 3}]
    lines = format_table(results_frame(recs)).splitlines()
    assert "(max)" in next(l for l in lines if l.startswith("small")) and "(p99)" in next(l for l in lines if l.startswith("big"))
    assert any("Recommended (fastest p50): small" in l for l in lines) and any("Best quality: big" in l for l in lines)

async def test_model_record_statuses_and_both_quality_numbers():
    ok = await benchmark_model(EchoAdapter(), BenchmarkSuite(n_dev=4))
    assert ok["status"] == "ok" and ok["n"] == 7 and ok["errors"] == 0 and len(ok["latencies_ms"]) == 7
    assert ok["quality_n"] == 4 and 0 <= ok["topic_accuracy"] <= 1 and 0 <= ok["rouge_l"] <= 1
    down = await benchmark_model(EchoAdapter("echo_down", fail_with=ConnectionError("no route")))
    assert down["status"] == "unavailable" and "no route" in down["reason"] and down["n"] == 0
    unknown = await benchmark_model("nosuch_1.0.0")
    assert unknown["status"] == "unavailable" and "available families" in unknown["reason"]

async def test_concurrency_sweep_counts_every_request():
    rows = await concurrency_sweep(EchoAdapter(), BenchmarkSuite(sweep_requests=8), [1, 4, 16])
    assert [(r["concurrency"], r["requests"], r["errors"]) for r in rows] == [(1, 8, 0), (4, 8, 0), (16, 16, 0)]
    assert all(r["throughput_rps"] > 0 for r in rows)

async def test_run_benchmark_writes_jsonl_and_pngs(tmp_path, capsys):
    df = await run_benchmark([EchoAdapter(), "nosuch_1.0.0"], BenchmarkSuite(n_dev=3, concurrency=(1, 4)), out_dir=tmp_path)
    assert list(df.status) == ["ok", "unavailable"] and df.attrs["machine"]["cpus"]
    assert [r["model_version"] for r in read_jsonl(tmp_path/"benchmark.jsonl")] == ["echo", "nosuch_1.0.0"]
    for name in ["benchmark_latency.png", "benchmark_quality_latency.png", "benchmark_quality_cost.png"]:
        assert (tmp_path/name).read_bytes()[:4] == b"\x89PNG"
    assert len(df.sweep[0]) == 2 and "Model Performance Comparison" in capsys.readouterr().out

def test_summary_pools_samples_across_rounds():
    m = lambda v, lat, q: {"model_version": v, "status": "ok", "latencies_ms": lat, "tokens_mean": 2.0, "errors": 0,
                           "topic_accuracy": q, "rouge_l": q/2, "quality_n": 2}
    rounds = [{"triggers": 3, "coalesced": [20, 30], "models": [m("a", [1.0]*60, 1.0), m("b", [5.0], 0.5)]},
              {"triggers": 1, "coalesced": [], "models": [m("a", [2.0]*60, 0.0)]}]
    s = summarize_rounds(rounds)
    a = s["models"]["a"]
    assert (a["n"], a["tail_label"], a["quality_n"], a["topic_accuracy"], a["rounds"]) == (120, "p99", 4, 0.5, 2)
    assert (s["triggers"], s["triggers_coalesced"], s["recommendation"]["fastest_model"]) == (4, 2, "a")

# --- the JSONL log ------------------------------------------------------------------------------------------------
def test_strict_json_and_torn_tail_repaired(tmp_path):
    f = tmp_path/"sub"/"log.jsonl"
    append_jsonl(f, {"a": float("nan"), "b": float("inf"), "p": tmp_path})
    with open(f, "a") as fh: fh.write('{"half": "a line whose writer di')   # a crash mid-write
    append_jsonl(f, [{"c": 1}, {"d": 2}])
    lines = f.read_text().splitlines()
    assert [json.loads(l) for l in lines] == [{"a": None, "b": None, "p": str(tmp_path)}, {"c": 1}, {"d": 2}]
    f.write_text('{"only": "torn')                                         # a torn first line
    append_jsonl(f, {"e": 3})
    assert f.read_text() == '{"e":3}\n'

def _writer(args):
    path, wid, k = args
    for i in range(k): append_jsonl(path, {"writer": wid, "i": i, "pad": f"{wid}-{i}-" + "x"*70_000})
    return wid

def test_processes_appending_to_one_log_never_interleave(tmp_path):
    "Lines far longer than PIPE_BUF, from 4 processes at once: each line whole and valid"
    path, writers, k = tmp_path/"log.jsonl", 8, 10
    with mp.get_context("spawn").Pool(4) as pool: pool.map(_writer, [(path, w, k) for w in range(writers)])
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    recs = [json.loads(l) for l in raw.splitlines()]
    assert sorted((r["writer"], r["i"]) for r in recs) == [(w, i) for w in range(writers) for i in range(k)]
    assert all(r["pad"] == f"{r['writer']}-{r['i']}-" + "x"*70_000 for r in recs)

# --- pipeline overhead ------------------------------------------------------------------------------------------
async def test_pipeline_overhead_measures_both_paths():
    df = await pipeline_overhead(n=200, warmup=20)
    assert list(df.path) == ["adapter direct", "through pipeline", "through pipeline - adapter direct"]
    assert list(df.n) == [200, 200, 200] and df.p99_us.notna().all() and df.paired_p50_us.iloc[2] is not None

async def test_paired_latency_reports_microseconds_and_alternates_the_order():
    order = []
    async def a(): order.append("a")
    async def b(): order.append("b")
    df = await paired_latency({"a": a, "b": b}, n=4, warmup=1)
    assert order == ["b", "a", "a", "b"] * 2 + ["b", "a"]  # the order alternates from one pair to the next
    assert list(df.columns) == ["path", "n", "p50_us", "p99_us", "mean_us", "paired_p50_us"]
    assert df.p99_us.isna().all()  # 4 samples: no p99 (fewer than P99_MIN_SAMPLES)

def test_the_table_says_why_quality_is_missing():
    rec = {"model_version": "echo", "status": "ok", "reason": None, "errors": 0, **latency_stats([1.0, 2.0]),
           "ttft_p50_ms": None, "tokens_per_s": None, "topic_accuracy": None, "rouge_l": None, "quality_n": 0,
           "quality_reason": "no dev data: BANKING77 data not found: /x/banking77/train.csv does not exist"}
    txt = format_table(results_frame([rec]))
    assert "Quality not measured: no dev data: BANKING77 data not found" in txt and "Quality on 0" not in txt


def test_the_dev_sample_draws_from_every_eval_set():
    from bankllm.benchmark import BenchmarkSuite
    d = BenchmarkSuite(n_dev=10).dev_sample()
    assert d.set.value_counts().to_dict() == {"bitext": 4, "real": 2, "scope": 2, "follow_up": 2}
    assert (d[d.set == "follow_up"].history.map(len) == 2).all() and (d[d.set != "follow_up"].history.map(len) == 0).all()
    assert BenchmarkSuite(n_dev=10).dev_sample() is d and BenchmarkSuite(n_dev=0).dev_sample().empty
