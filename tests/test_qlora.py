"""QLoRA for real on a tiny locally built Llama: bitsandbytes 4-bit NF4 loading, peft LoRA training, saving,
loading and merging adapters. CPU (bitsandbytes 0.50 runs NF4 there); the CUDA path is the same code with bf16."""
import json
from dataclasses import asdict

import pandas as pd
import pytest
import torch

from bankllm.qlora import (QLORA_RECIPES, QLoRAConfig, add_lora, adapter_base, adapter_dir, adapter_record, chat_batch,
                           chat_example, chat_examples, finetune_qlora, finetune_recipe, load_adapted, load_base,
                           merge_adapter, resolve_base, trainable_parameters, weight_memory)
from bankllm.tokenizer import BPETokenizer
from bankllm.training import save_checkpoint
from bankllm.transformer import BankingLLM, ModelConfig

PAIRS = pd.DataFrame({"question": ["Where is my card?", "How do I close my account?", "I need a loan", "Fees abroad?"],
                      "answer": ["It is on its way, usually within five days.", "Visit a branch with your ID.",
                                 "Apply in the app under Loans.", "Card payments abroad cost 1%."]})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    "A tiny custom checkpoint (our format): the QLoRA code exports it to the Llama format itself"
    tok = BPETokenizer.train(list(PAIRS.question) + list(PAIRS.answer) * 5, vocab_size=300)
    torch.manual_seed(0)
    model = BankingLLM(ModelConfig.tiny(vocab_size=tok.vocab_size, n_embd=64, n_head=4, n_kv_head=4, block_size=128))
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("ckpt")/"tiny_custom")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BANKLLM_CACHE_DIR", str(tmp_path/"cache"))


def test_custom_checkpoints_are_exported_once_and_cached(ckpt, tmp_path):
    a = resolve_base(ckpt, tmp_path)
    assert (tmp_path/"hf").is_dir() and json.loads((tmp_path/"hf"/a.split("/")[-1]/"config.json").read_text())["model_type"] == "llama"
    assert resolve_base(ckpt, tmp_path) == a
    assert resolve_base("some-org/some-model") == "some-org/some-model"


def test_4bit_loading_quantizes_every_block_linear_and_nothing_else(ckpt):
    import bitsandbytes as bnb
    model, _ = load_base(ckpt, quantize=True, device="cpu")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    q = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q) == 2 * 7 and set(q) == {n for n in linears if n != "lm_head"}
    mem = weight_memory(model)
    assert mem["bits_per_quantized_weight"] == pytest.approx(4 + 8/64 + 32/(64*256), abs=0.01)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.nested  # double quantization


def test_lora_trains_only_the_adapters(ckpt):
    model, _ = load_base(ckpt, device="cpu")
    pm = add_lora(model, QLoRAConfig(r=4))
    trainable, total = trainable_parameters(pm)
    assert trainable == 2 * 4 * (4*(64+64) + 3*(64+pm.config.intermediate_size))
    assert all(("lora_" in n) == p.requires_grad for n, p in pm.named_parameters())


def test_answer_only_labels(ckpt):
    _, tok = load_base(ckpt, quantize=False, device="cpu")
    ids, labels = chat_example(tok, "Where is my card?", "On its way.")
    kept = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(kept) == "On its way.<|end|>" and labels[0] == -100
    b = chat_batch([(ids, labels), (ids[:5], labels[:5])], tok.pad_token_id)
    assert b["attention_mask"][1].tolist() == [1]*5 + [0]*(len(ids) - 5) and (b["labels"][1, 5:] == -100).all()


def test_max_answer_keeps_only_the_first_answer_tokens(ckpt):
    _, tok = load_base(ckpt, quantize=False, device="cpu")
    full, _ = chat_example(tok, "Where is my card?", "It is on its way, usually within five days.")
    ids, labels = chat_example(tok, "Where is my card?", "It is on its way, usually within five days.", max_answer=3)
    prompt = sum(l == -100 for l in labels)
    assert len(ids) == prompt + 3 and ids == full[:len(ids)] and all(l != -100 for l in labels[prompt:])
    rows = pd.DataFrame({"question": ["Where is my card?"] * 2, "answer": ["It is on its way, usually within five days."] * 2,
                         "max_answer": pd.array([3, None], dtype="Int64")})
    a, b = chat_examples(tok, rows, QLoRAConfig())
    assert a == (ids, labels) and b[0] == full


def test_bf16_autocast_training_runs_and_records_it(ckpt, tmp_path):
    cfg = QLoRAConfig(r=4, steps=2, batch_size=2, eval_every=1, warmup=1, device="cpu", dtype="bf16")
    r = finetune_qlora(ckpt, tmp_path/"a", cfg, PAIRS, {"x": PAIRS.head(2), "y": PAIRS.tail(2)}, progress=False)
    assert r.record["hardware"]["autocast"] == "torch.bfloat16" and set(r.record["dev_loss_by_set"]) == {"x", "y"}
    assert r.record["dev_examples"] == {"x": 2, "y": 2}


def test_recipes_name_their_base_and_the_shipped_records_match():
    from bankllm.training import RECIPES
    for version, (base, cfg, mix) in QLORA_RECIPES.items():
        assert base in RECIPES and (mix is None or mix == RECIPES[base][2])
        rec = adapter_record(version)
        assert rec["base"] == base and rec["steps"] == cfg.steps
        assert {k: v for k, v in rec["config"].items() if k not in ("device", "dtype")} == \
               {k: v for k, v in asdict(cfg).items() if k not in ("device", "dtype")}
    with pytest.raises(ValueError, match="known are"): finetune_recipe("qlora_vllm_finetuned_model_v9.9.9")


def test_finetune_learns_and_the_saved_adapter_reloads_exactly(ckpt, tmp_path):
    cfg = QLoRAConfig(r=8, alpha=16, dropout=0.0, steps=30, batch_size=4, lr=1e-2, grad_clip=1.0, warmup=2,
                      eval_every=10, device="cpu", dtype="fp32")  # fp32: the reload below must match to 1e-3
    r = finetune_qlora(ckpt, tmp_path/"adapter", cfg, PAIRS, PAIRS, progress=False, version="qlora_test_v0")
    dev = [h["dev_loss"] for h in r.history if "dev_loss" in h]
    before = r.history[0]["loss"]  # step 0: B = 0, so this is the base's loss on all four pairs (the dev set too)
    assert dev[-1] < before - 0.5, (before, dev)  # a random tiny base learns the four answers
    # the record's per-set losses: the base alone (adapter disabled) is where training started, adapted where it ended
    assert r.record["dev_loss_by_set"]["dev"] == pytest.approx(dict(base=before, adapted=dev[-1]), abs=1e-3)
    assert r.record["dev_examples"] == {"dev": 4} and r.record["hardware"]["autocast"] == "None"
    files = {p.name for p in (tmp_path/"adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= files
    assert adapter_base(tmp_path/"adapter") == str(ckpt)  # the name the caller gave, not a cache path
    assert json.loads((tmp_path/"adapter"/"adapter_config.json").read_text())["base_model_name_or_path"] == str(ckpt)
    # reloading base (4-bit) + adapter reproduces the fine-tuned model's dev loss
    model, tok = load_adapted(tmp_path/"adapter", device="cpu")
    batch = chat_batch([chat_example(tok, q, a) for q, a in zip(PAIRS.question, PAIRS.answer)], tok.pad_token_id)
    with torch.no_grad(): loss = model(**batch).loss.item()
    assert loss == pytest.approx(dev[-1], abs=1e-3)


def test_merge_matches_base_plus_adapter(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok = load_base(ckpt, quantize=False, device="cpu")
    pm = add_lora(model, QLoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path/"a")
    x = torch.tensor([chat_example(tok, "Fees abroad?", "1%.")[0]])
    with torch.no_grad(): want = pm.eval()(x).logits
    out = merge_adapter(tmp_path/"a", tmp_path/"merged", base=ckpt)
    with torch.no_grad(): got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(x).logits
    assert (got - want).abs().max() < 1e-4


def test_missing_adapter_names_the_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="qlora_vllm_finetuned_model_v1.0.0"):
        adapter_dir(tmp_path/"nothing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the 4-bit path with bf16 compute)")
def test_cuda_4bit_training_step(ckpt, tmp_path):
    cfg = QLoRAConfig(r=4, steps=3, batch_size=2, eval_every=3, device="cuda")
    r = finetune_qlora(ckpt, tmp_path/"a", cfg, PAIRS, PAIRS, progress=False)
    assert r.record["peak_cuda_memory_mb"] > 0
