"compare_answers / compare_html / bench --out compare.html: one row per (question, model), every answer escaped, the page written."
import pandas as pd

from bankllm.benchmark import COMPARE_COLUMNS, BenchmarkSuite, compare_answers, compare_html, run_benchmark
from bankllm.cli import main
from bankllm.records import read_jsonl
from bankllm.testing import EchoAdapter

class ScriptEcho(EchoAdapter):
    "Untrusted output: every answer starts with a script"
    def _words(self, prompt, max_tokens):
        words, cut = super()._words(prompt, max_tokens)
        return ["<script>alert(1)</script> ", *words], cut

QS = pd.DataFrame(dict(question=["How do I block my card?", "What are the ATM fees?"],
                       intent=["block_card", "check_fees"], set=["real", "bitext"],
                       answer=["", "ATM fees depend on your account."]))

async def test_rows_and_columns():
    df = await compare_answers([EchoAdapter(), ScriptEcho("echo_script"), "nosuch_1.0.0"], QS)
    assert list(df.columns) == COMPARE_COLUMNS and len(df) == 6
    assert df.q.tolist() == [0, 0, 0, 1, 1, 1]
    assert df.model.tolist()[:3] == ["echo", "echo_script", "nosuch_1.0.0"]
    assert df.question.tolist()[::3] == QS.question.tolist() and df.set.tolist()[::3] == ["real", "bitext"]
    bad = df[df.model == "nosuch_1.0.0"]
    assert bad.error.str.contains("available families").all() and (bad.answer == "").all() and not bad.correct.any()
    assert bad.rouge_l.isna().all()
    ok = df[df.model != "nosuch_1.0.0"]
    assert ok.error.isna().all() and (ok.latency_ms > 0).all() and (ok.tokens > 0).all() and ok.topic.notna().all()
    assert df.rouge_l[df.set == "real"].isna().all() and df.rouge_l[ok.index][df.set == "bitext"].notna().all()
    assert "earlier_turn" in df and (df.earlier_turn == "").all()

async def test_follow_ups_keep_their_earlier_turn():
    qs = BenchmarkSuite(n_dev=5).dev_sample()
    df = await compare_answers([EchoAdapter()], qs)
    fu = df[df.set == "follow_up"]
    assert len(fu) == 1 and fu.earlier_turn.iloc[0] and len(df) == len(qs)

async def test_html_escapes_answers_and_is_self_contained():
    page = compare_html(await compare_answers([EchoAdapter(), ScriptEcho("echo_script")], QS), title="<b>t</b>")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;t&lt;/b&gt;" in page
    assert page.count("<table>") == 2 and "http" not in page and "src=" not in page
    assert "✓ right" in page or "✗ wrong" in page

async def test_run_benchmark_reuses_its_dev_answers(tmp_path):
    suite = BenchmarkSuite(n_dev=3, warmup=0, max_tokens=8)
    df = await run_benchmark([EchoAdapter(), ScriptEcho("echo_script")], suite, out_dir=tmp_path, show=False)
    page = (tmp_path/"compare.html").read_text()
    assert page.count("<table>") == 3 and page.count("<tr class=") == 6 and "&lt;script&gt;" in page
    assert "answers" not in df and all("answers" not in r for r in read_jsonl(tmp_path/"benchmark.jsonl"))

def test_cli_writes_the_page(tmp_path, capsys):
    assert main(["bench", "--models", "custom-test", "--n", "3", "--concurrency", "", "--max-tokens", "8", "--out", str(tmp_path)]) == 0
    assert "compare.html" in capsys.readouterr().out
    page = (tmp_path/"compare.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == 3
