"The `bankllm` command: help, chat with a registered test model (plain, streamed, JSON), errors, bench to a tmp dir."
import json, os, subprocess, sys, time

import pytest

from bankllm.cli import build_parser, main

def test_help(capsys):
    with pytest.raises(SystemExit) as e: main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ["chat", "serve", "bench", "train", "examples:", "LLM_MODEL_VERSION", "--env-file"]: assert word in out
    for cmd in ["chat", "serve", "bench", "train"]:
        assert "example" in build_parser()._subparsers._group_actions[0].choices[cmd].format_help()

def test_no_command_prints_help(capsys):
    assert main([]) == 2 and "usage: bankllm" in capsys.readouterr().out

def test_help_is_light():
    "`bankllm --help` imports neither torch nor fastapi nor matplotlib"
    code = ("import sys; from bankllm.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'fastapi', 'matplotlib', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")

def test_chat(capsys):
    assert main(["chat", "What are the ATM fees?", "--model", "custom-test", "--max-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "You asked: What are the\n"
    assert "custom-test" in cap.err and "5 tokens" in cap.err

def test_chat_stream_and_json(capsys):
    assert main(["chat", "hi", "--model", "custom-test", "--stream", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("You asked: hi A banking")
    assert main(["chat", "hi", "--model", "custom-test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model_version"] == "custom-test" and r["request_number"] == 1

@pytest.mark.parametrize("argv,code,msg", [
    (["chat", "hi", "--model", "nosuchmodel"], 2, "unknown model"),
    (["chat", "hi", "--model", "gemini"], 1, "GEMINI_API_KEY"),
    (["chat", "   ", "--model", "custom-test"], 2, "empty"),
    (["chat", "hi", "--model", "custom-test", "--max-tokens", "0"], 1, "max_tokens"),
    (["chat", "hi", "--env-file", "/nonexistent/.env"], 2, "env file not found"),
    (["bench", "--concurrency", "a,b"], 2, "--concurrency"),
])
def test_errors(capsys, argv, code, msg):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err

def test_bad_option_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e: main(["chat", "hi", "--max-tokens", "many"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err

def test_bench(tmp_path, capsys):
    assert main(["bench", "--models", "custom-test", "--n", "0", "--concurrency", "1,2", "--max-tokens", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Model Performance Comparison" in out and "custom-test" in out and "wrote to" in out
    assert {p.name for p in tmp_path.iterdir()} == {"benchmark.jsonl", "benchmark_latency.png", "benchmark_quality_latency.png", "benchmark_quality_cost.png"}
    (rec,) = [json.loads(l) for l in (tmp_path/"benchmark.jsonl").read_text().splitlines()]
    assert rec["model_version"] == "custom-test" and rec["status"] == "ok" and [s["concurrency"] for s in rec["sweep"]] == [1, 2]

def test_bench_kv_cache_on_the_configured_checkpoint(tmp_path, capsys, monkeypatch):
    "--kv-cache measures the model BANKLLM_CUSTOM_CHECKPOINT names; answers that would overflow the context are cut to fit"
    import torch
    from bankllm.tokenizer import BPETokenizer
    from bankllm.training import save_checkpoint
    from bankllm.transformer import BankingLLM, ModelConfig
    tok = BPETokenizer.train(["How do I dispute an ATM withdrawal?", "Call us and we will help."] * 5, vocab_size=300)
    torch.manual_seed(0)
    ckpt = save_checkpoint(BankingLLM(ModelConfig.tiny(vocab_size=tok.vocab_size)).eval(), tok, tmp_path/"tiny")
    monkeypatch.setenv("BANKLLM_CUSTOM_CHECKPOINT", str(ckpt))
    assert main(["bench", "--kv-cache", "--runs", "1", "--out", str(tmp_path/"out")]) == 0  # 256 tokens asked, block_size 64
    out = capsys.readouterr().out
    assert "recompute" in out and "identical greedy tokens" in out and str(ckpt) in out
    rec = json.loads((tmp_path/"out"/"kv_cache.json").read_text())
    assert rec["checkpoint"] == str(ckpt) and [r["mode"] for r in rec["rows"]] == ["KV cache", "recompute"]
    assert rec["rows"][0]["new_tokens"] == rec["rows"][1]["new_tokens"] == 64 - rec["prompt_tokens"]
    assert rec["params"] == sum(p.numel() for p in BankingLLM(ModelConfig.tiny(vocab_size=tok.vocab_size)).parameters())

def test_bench_kv_cache_context_too_small_is_a_message(tmp_path, capsys, monkeypatch):
    from bankllm.tokenizer import BPETokenizer
    from bankllm.training import save_checkpoint
    from bankllm.transformer import BankingLLM, ModelConfig
    tok = BPETokenizer.train(["How do I dispute an ATM withdrawal?"] * 5, vocab_size=300)
    ckpt = save_checkpoint(BankingLLM(ModelConfig.tiny(vocab_size=tok.vocab_size, block_size=8)), tok, tmp_path/"short")
    monkeypatch.setenv("BANKLLM_CUSTOM_CHECKPOINT", str(ckpt))
    assert main(["bench", "--kv-cache", "--out", str(tmp_path/"out")]) == 1
    err = capsys.readouterr().err
    assert "does not fit its context of 8" in err and "Traceback" not in err

def test_bench_kv_cache_rejects_zero_runs(capsys):
    assert main(["bench", "--kv-cache", "--runs", "0"]) == 2 and "at least 1" in capsys.readouterr().err

def test_bench_all_unavailable_is_status_1(tmp_path, capsys):
    assert main(["bench", "--models", "gemini", "--n", "0", "--concurrency", "", "--out", str(tmp_path)]) == 1
    assert "unavailable" in capsys.readouterr().out

def test_console_script():
    "The installed `bankllm` command exists and teaches"
    exe = __import__("shutil").which("bankllm", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None: pytest.skip("bankllm console script not installed (pip install -e .)")
    out = subprocess.run([exe, "chat", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--stream" in out and "example" in out


def test_train_reproduces_a_shipped_recipe_and_flags_override_it(monkeypatch, tmp_path, capsys):
    import bankllm.training as training
    calls = []
    def fake(out, model_cfg, train_cfg, **kw):
        calls.append((out, model_cfg, train_cfg, kw))
        return None, None, {"version": kw["version"]}
    monkeypatch.setattr(training, "train_custom_model", fake)
    assert main(["train", "--out", str(tmp_path), "--no-progress"]) == 0
    _, mc, tc, kw = calls[-1]
    shipped_mc, shipped_tc, shipped_mix = training.RECIPES[training.SHIPPED_VERSION]
    assert (mc, tc.steps, tc.batch_size, kw["mix"], kw["version"]) == (shipped_mc, shipped_tc.steps, shipped_tc.batch_size,
                                                                      shipped_mix, training.SHIPPED_VERSION)
    assert main(["train", "--out", str(tmp_path), "--version", "custom_model_built_0.0.0", "--steps", "7", "--no-progress"]) == 0
    _, mc, tc, kw = calls[-1]
    assert kw["mix"] is None and mc.block_size == 320 and tc.steps == 7 and tc.batch_size == 16


def test_train_a_shipped_adapter_recipe_for_real(tmp_path, capsys):
    "`bankllm train --version qlora_…` runs `finetune_recipe` (4-bit base, the recipe's mix) and saves a loadable adapter"
    from bankllm.config import get_config
    pytest.importorskip("peft"); pytest.importorskip("bitsandbytes")
    if not get_config().data_dir: pytest.skip("needs the data sets (BANKLLM_DATA_DIR)")
    out = tmp_path/"adapter"
    assert main(["train", "--version", "qlora_vllm_finetuned_model_v1.1.0", "--steps", "1", "--batch-size", "2",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "base: custom_model_built_0.1.0" in text and f"BANKLLM_QLORA_ADAPTER={out}" in text
    rec = json.loads((out/"training.json").read_text())
    assert rec["steps"] == 1 and rec["config"]["max_len"] == 512 and set(rec["dev_loss_by_set"]) == {"bitext", "real", "scope", "follow_up"}
    assert rec["data"]["mix"]["out_of_scope_share"] == 0.3 and (out/"adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit, match="known are qlora_vllm_finetuned_model_v1.0.0"):
        main(["train", "--version", "qlora_vllm_finetuned_model_v9.0.0"])


def test_serve_gives_the_custom_engine_every_core(tmp_path):
    "`bankllm serve` keeps its own torch work on one thread and gives the custom model's engine every core (07b_batching)"
    import httpx
    from bankllm.testing import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BANKLLM_CUSTOM_THREADS"}
    env.update(ENABLE_BENCHMARKING="false", BANKLLM_BENCHMARK_LOG=str(tmp_path/"log.jsonl"))
    p = subprocess.Popen([sys.executable, "-c", "import sys; from bankllm.cli import main; sys.exit(main(sys.argv[1:]))",
                          "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200: break
            except httpx.HTTPError: pass
            assert p.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.3)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json=dict(
            model="custom", messages=[{"role": "user", "content": "I lost my card"}], max_tokens=4))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        gauge = [l for l in httpx.get(url + "/metrics", timeout=10).text.splitlines() if l.startswith("bankllm_batch_engine_threads")]
        assert len(gauge) == 1 and float(gauge[0].split()[-1]) == os.cpu_count()
    finally:
        p.terminate()
        err = p.communicate(timeout=30)[1]
    assert f"engine torch threads: custom {os.cpu_count()}, qlora 1" in err


def test_an_explicit_engine_threads_setting_wins_over_the_serving_layout():
    from bankllm.batching import serving_config
    from bankllm.config import get_config
    assert serving_config(get_config(), cores=6).custom_threads == 6
    assert serving_config(get_config(custom_threads=1), cores=6).custom_threads == 1
    assert serving_config(get_config(), cores=1000).custom_threads == 256  # the setting's own bound
    q = serving_config(get_config(llm_model_version="qlora_vllm_finetuned_model_v1.2.0"), cores=6)
    assert (q.qlora_threads, q.custom_threads) == (6, 1)  # only the active model's engine takes the cores
    assert serving_config(get_config(llm_model_version="gemini_3.5_flash_v1.0.0"), cores=6).custom_threads == 1
