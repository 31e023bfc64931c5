"The transformer: KV cache equals recompute, sampling filters, loss masking, limits, Hugging Face parity, light import."
import math
import subprocess
import sys

import pytest
import torch

from bankllm.transformer import BankingLLM, CausalSelfAttention, KVCache, ModelConfig, count_params, hf_state_dict, llama_config_dict

CONFIGS = {
    "mha": ModelConfig.tiny(),
    "gqa": ModelConfig.tiny(n_embd=64, n_head=4, n_kv_head=2),
    "mqa-untied": ModelConfig.tiny(n_embd=48, n_head=3, n_kv_head=1, n_layer=3, tie_embeddings=False),
    "hd12": ModelConfig.tiny(n_embd=36, n_head=3, n_kv_head=3),  # 1/sqrt(head_dim) and sqrt(C) not powers of two
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "Tiny models gain nothing from threads, and on a shared machine OpenMP waits make them erratic"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lively(cfg, seed=0):
    "A random model with weights large enough that greedy decoding does not just repeat one token"
    torch.manual_seed(seed)
    m = BankingLLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2: p.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prompt_len", [1, 7, 30])
def test_cache_equals_recompute_greedy(name, prompt_len):
    m = lively(CONFIGS[name], seed=prompt_len)
    prompt = torch.randint(0, m.config.vocab_size, (prompt_len,)).tolist()
    a = m.generate(prompt, 24, temperature=0, use_cache=True)
    b = m.generate(prompt, 24, temperature=0, use_cache=False)
    assert a.ids == b.ids and len(a.ids) == 24
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_cache_equals_recompute_when_sampling():
    m = lively(CONFIGS["gqa"])
    kw = dict(temperature=0.9, top_k=40, top_p=0.95)
    a = m.generate([1, 2, 3], 20, use_cache=True, generator=torch.Generator().manual_seed(3), **kw)
    b = m.generate([1, 2, 3], 20, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert a.ids == b.ids


def test_chunked_prefill_matches_full_forward():
    m = lively(CONFIGS["gqa"])
    seq = torch.randint(0, m.config.vocab_size, (2, 30))
    full, _ = m(seq)
    cache = m.new_cache(batch_size=2)
    for s, e in [(0, 9), (9, 10), (10, 21), (21, 30)]:
        last, _ = m(seq[:, s:e], cache=cache, start_pos=s)
        torch.testing.assert_close(last[:, -1], full[:, e - 1], atol=1e-4, rtol=1e-4)
    assert cache.length == 30



@pytest.mark.parametrize("name", CONFIGS)
def test_decode_step_equals_forward_with_cache(name):
    m = lively(CONFIGS[name])
    seq = torch.randint(0, m.config.vocab_size, (1, 25))
    c1, c2 = m.new_cache(), m.new_cache()
    with torch.inference_mode():
        m(seq[:, :5], cache=c1); m(seq[:, :5], cache=c2)  # prefill, then one token at a time
        for t in range(5, 25):
            fast = m.decode_step(int(seq[0, t]), c1, t)
            slow = m(seq[:, t:t + 1], cache=c2, start_pos=t)[0][0, -1]
            torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert c1.length == c2.length == 25
    for a, b in zip(c1.k + c1.v, c2.k + c2.v): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_decode_step_in_bfloat16_is_as_close_as_forward():
    "A bfloat16 model decodes through the same fast path: no further from float32 than bfloat16 `forward` is"
    ref = lively(CONFIGS["gqa"])
    m = lively(CONFIGS["gqa"]).to(torch.bfloat16)
    seq = torch.randint(0, m.config.vocab_size, (1, 20))
    c1, c2, c3 = m.new_cache(), m.new_cache(), ref.new_cache()
    err_fast = err_forward = 0.0
    with torch.inference_mode():
        m(seq[:, :4], cache=c1); m(seq[:, :4], cache=c2); ref(seq[:, :4], cache=c3)
        for t in range(4, 20):
            fast = m.decode_step(int(seq[0, t]), c1, t)
            slow = m(seq[:, t:t + 1], cache=c2, start_pos=t)[0][0, -1]
            exact = ref(seq[:, t:t + 1], cache=c3, start_pos=t)[0][0, -1]
            err_fast = max(err_fast, ((fast - exact).abs().max() / exact.abs().max()).item())
            err_forward = max(err_forward, ((slow - exact).abs().max() / exact.abs().max()).item())
    assert fast.dtype == torch.float32 and c1.k[0].dtype == torch.bfloat16 and m.decode_weights().head.dtype == torch.bfloat16
    assert 0 < err_fast <= 2 * err_forward  # bfloat16 rounding, not a wrong dtype or a lost scale


def test_decode_weights_follow_the_parameters():
    m = lively(CONFIGS["gqa"])
    keys = set(m.state_dict())
    dw = m.decode_weights()
    assert m.decode_weights() is dw and set(m.state_dict()) == keys  # reused; never saved
    other = lively(CONFIGS["gqa"], seed=1)
    m.load_state_dict(other.state_dict())  # in-place copy: the copies must be rebuilt
    assert m.decode_weights() is not dw
    assert m.generate([4, 5, 6], 20, temperature=0).ids == other.generate([4, 5, 6], 20, temperature=0, use_cache=False).ids
    with torch.no_grad(): m.layers[1].self_attn.o_proj.weight.mul_(-1)  # an optimiser-like in-place update
    assert m.generate([4, 5, 6], 20, temperature=0).ids == m.generate([4, 5, 6], 20, temperature=0, use_cache=False).ids


def test_the_package_generates_with_the_fast_step():
    "07a's `decoder` comes after 03's in the module: generation builds the decode copies and gives the recompute's tokens"
    from bankllm import transformer
    from bankllm.transformer import DecodeWeights, kv_cache_benchmark  # names 07a exports stay importable
    assert callable(BankingLLM.decode_step) and callable(BankingLLM.decode_weights) and callable(kv_cache_benchmark)
    m = lively(CONFIGS["gqa"])
    assert getattr(m, "_decode_weights", None) is None
    g = m.generate([4, 5, 6], 20, temperature=0)
    assert isinstance(m._decode_weights, DecodeWeights) and g.ids == m.generate([4, 5, 6], 20, temperature=0, use_cache=False).ids
    assert transformer.__all__.count("DecodeWeights") == 1 and "kv_cache_benchmark" in transformer.__all__


@pytest.mark.parametrize("kw", [dict(dropout=0.5), dict(attn_dropout=0.5)])
def test_training_mode_with_dropout_uses_forward_and_still_generates(kw):
    m = lively(ModelConfig.tiny(**kw)).train()
    g = m.generate([1, 2, 3], 10, temperature=0)
    assert len(g.ids) == 10 and getattr(m, "_decode_weights", None) is None


@pytest.mark.parametrize("kw, attn_p", [(dict(dropout=0.3), 0.0), (dict(attn_dropout=0.3), 0.3)])
def test_dropout_is_residual_and_attention_dropout_is_its_own(kw, attn_p):
    "`dropout` drops the attention and FFN outputs; only `attn_dropout` drops attention weights (off the fused kernel)"
    m = lively(ModelConfig.tiny(**kw))
    assert {a.dropout for a in m.modules() if isinstance(a, CausalSelfAttention)} == {attn_p}
    x = torch.tensor([[1, 2, 3, 4, 5]])
    torch.manual_seed(0); a = m.train()(x)[0]
    torch.manual_seed(1); b = m(x)[0]
    assert not torch.equal(a, b)  # training: random drops
    m.eval(); assert torch.equal(m(x)[0], m(x)[0])  # evaluation: none
    assert ModelConfig.from_dict({k: v for k, v in m.config.to_dict().items() if k != "attn_dropout"}).attn_dropout == 0.0


def test_decode_step_checks_positions():
    m = BankingLLM(ModelConfig.tiny()).eval()
    with pytest.raises(ValueError, match="gap"): m.decode_step(1, m.new_cache(), 3)
    c = m.new_cache(); c.length = m.config.block_size
    with pytest.raises(ValueError, match="block_size"): m.decode_step(1, c, m.config.block_size)

def test_cache_shape_and_dtype():
    cfg = CONFIGS["gqa"]
    c = BankingLLM(cfg).new_cache()
    assert isinstance(c, KVCache) and len(c.k) == cfg.n_layer
    assert c.k[0].shape == (1, cfg.n_kv_head, cfg.block_size, cfg.head_dim) and c.k[0].dtype == torch.float32


def test_exceeding_block_size_raises():
    m = BankingLLM(ModelConfig.tiny()).eval()
    bs = m.config.block_size
    with pytest.raises(ValueError, match="block_size"): m(torch.zeros(1, bs + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"): m(torch.zeros(1, 2, dtype=torch.long), cache=m.new_cache(), start_pos=bs - 1)
    with pytest.raises(ValueError, match="block_size"): m.generate(list(range(bs + 1)), 5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_stops_when_context_is_full(use_cache):
    m = lively(ModelConfig.tiny())
    bs = m.config.block_size
    g = m.generate(list(range(bs - 3)), 50, temperature=0, use_cache=use_cache)
    assert len(g.ids) == 3 and g.finish_reason == "length"
    assert m.generate(list(range(bs)), 5, temperature=0, use_cache=use_cache).ids == []


def test_top_k_1_and_tiny_top_p_equal_greedy():
    m = lively(CONFIGS["gqa"])
    prompt = [3, 14, 15, 92]
    greedy = m.generate(prompt, 20, temperature=0).ids
    gen = torch.Generator().manual_seed(0)
    assert m.generate(prompt, 20, temperature=1.3, top_k=1, generator=gen).ids == greedy
    assert m.generate(prompt, 20, temperature=1.3, top_p=1e-6, generator=gen).ids == greedy


def test_sampling_is_reproducible_and_varied():
    m = lively(CONFIGS["mha"])
    runs = [m.generate([5], 20, temperature=1.0, generator=torch.Generator().manual_seed(s)).ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_logprobs_are_finite_and_not_positive():
    m = lively(CONFIGS["gqa"])
    for kw in (dict(temperature=0), dict(temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(0))):
        g = m.generate([7, 8, 9], 30, **kw)
        assert len(g.logprobs) == len(g.ids) == 30
        assert all(math.isfinite(lp) and lp <= 0 for lp in g.logprobs)
        assert 0 < g.confidence <= 1


def test_stop_id_is_yielded_by_stream_but_not_returned_by_generate():
    m = lively(CONFIGS["mha"])
    ids = m.generate([1, 2], 10, temperature=0).ids
    stop = ids[4]
    k = ids.index(stop)
    streamed = [t for t, _ in m.stream_generate([1, 2], 10, temperature=0, stop_ids=iter([stop]))]
    assert streamed == ids[:k + 1]
    g = m.generate([1, 2], 10, temperature=0, stop_ids=iter([stop]))  # a one-shot iterable works too
    assert g.ids == ids[:k] and g.finish_reason == "stop" and len(g.logprobs) == k


def test_bad_sampling_arguments_raise():
    m = BankingLLM(ModelConfig.tiny())
    for kw in (dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError): m.generate([1], 3, **kw)
    with pytest.raises(ValueError, match="at least one"): m.generate([], 3)
    with pytest.raises(ValueError, match="batch size 1"): m.generate(torch.zeros(2, 3, dtype=torch.long), 3)
    assert m.generate(torch.tensor([[1, 2]]), 2, temperature=0).ids == m.generate([1, 2], 2, temperature=0).ids


def test_masked_targets_are_ignored_by_the_loss():
    m = BankingLLM(ModelConfig.tiny()).eval()
    idx = torch.randint(0, 300, (3, 20))
    targets = torch.randint(0, 300, (3, 20))
    keep = torch.rand(3, 20) > 0.4
    logits, loss = m(idx, targets.masked_fill(~keep, -100))
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_tied_params_counted_once():
    tied, untied = BankingLLM(ModelConfig.tiny()), BankingLLM(ModelConfig.tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    assert count_params(untied) - count_params(tied) == 300 * 32


def test_config_round_trip_and_validation():
    cfg = CONFIGS["mqa-untied"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_kv_head"): ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_head"): ModelConfig(n_embd=250, n_head=4)


@pytest.mark.parametrize("name", CONFIGS)
def test_hugging_face_parity(name):
    transformers = pytest.importorskip("transformers")
    m = lively(CONFIGS[name])
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(m.config))).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(m), strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if m.config.tie_embeddings else [])
    idx = torch.randint(0, m.config.vocab_size, (2, 40))
    with torch.no_grad(): torch.testing.assert_close(hf(idx).logits, m(idx)[0], atol=1e-4, rtol=1e-4)


def test_import_does_not_load_transformers():
    code = "import sys, bankllm.transformer; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
