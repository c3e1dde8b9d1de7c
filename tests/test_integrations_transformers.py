"""Hugging Face transformers models on fusedstab: replace_modules on small randomly initialised models
built from configs (never downloaded): Llama, Qwen2, Gemma, T5, BERT and GPT-2. Their norms become
fusedstab's (each recognised by its class's numerics), their attention runs on fusedstab's kernels
(attn_implementation "fusedstab": padding and causal masks, grouped-query attention, T5's position
bias), and logits and gradients match the unconverted model (sdpa) to fp32 rounding.

Skipped where transformers is not installed (it is in the ``test`` extra).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fusedstab

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(cfg)


def _gemma():
    cfg = transformers.GemmaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=32)
    return transformers.GemmaForCausalLM(cfg)


def _t5():
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


# name -> (constructor, norm kind expected in its replaced entries)
MODELS = {"llama": (_llama, "LlamaRMSNorm -> fused rms_norm_llama"),
          "qwen2": (_qwen2, "Qwen2RMSNorm -> fused rms_norm_llama"),
          "gemma": (_gemma, "GemmaRMSNorm -> fused rms_norm_gemma"),
          "t5": (_t5, "T5LayerNorm -> fused rms_norm_t5"),
          "bert": (_bert, "torch.nn.LayerNorm -> fusedstab.nn.LayerNorm"),
          "gpt2": (_gpt2, "torch.nn.LayerNorm -> fusedstab.nn.LayerNorm")}


def _inputs(name):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding on one row (the mask reaches the attention kernels)
    kw = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        kw["decoder_input_ids"] = torch.randint(1, 50, (2, 5), generator=g)
    return kw


def _run(model, kw):
    model.zero_grad(set_to_none=True)
    logits = model(**kw).logits
    logits.backward(torch.ones_like(logits) / logits.numel() + 0.01 * torch.sin(torch.arange(logits.numel()))
                    .view(logits.shape))
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _make(name):
    torch.manual_seed(0)
    model = MODELS[name][0]()
    with torch.no_grad():  # norms away from their initial 1 (or Gemma's 0)
        for n, p in model.named_parameters():
            if "norm" in n.lower() and p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.train(False)


@pytest.mark.parametrize("name", list(MODELS))
def test_replace_modules_parity(name):
    model = _make(name)
    twin = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = fusedstab.nn.replace_modules(model, return_report=True)
    replaced = " | ".join(report.replaced)
    assert MODELS[name][1] in replaced, str(report)
    assert "attention 'sdpa' -> 'fusedstab'" in replaced, str(report)
    assert not [k for k in report.left if "Norm" in k], str(report)
    assert model.config._attn_implementation == "fusedstab" and list(model.state_dict()) == keys
    kw = _inputs(name)
    with fusedstab.use_backend("torch"):
        got, g_got = _run(model, kw)
    want, g_want = _run(twin, kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert g_got.keys() == g_want.keys()
    for n, g in g_want.items():
        torch.testing.assert_close(g_got[n], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()),
                                   msg=lambda m: f"{n}: {m}")


def test_llama_on_every_backend(op_backend):
    """The kernels behind the attention function (GQA with a padding mask, causal) on each backend."""
    model = _make("llama")
    twin = copy.deepcopy(model)
    fusedstab.nn.replace_modules(model)
    kw = _inputs("llama")
    got, _ = _run(model, kw)
    want, _ = _run(twin, kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attn_implementation_by_name():
    """register() makes "fusedstab" a name transformers accepts at construction."""
    from fusedstab.integrations import transformers as fs_hf

    fs_hf.register()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="fusedstab")
    assert model.config._attn_implementation == "fusedstab"
    calls = []
    real = fs_hf.fusedstab_attention_forward
    transformers.AttentionInterface.register("fusedstab", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        ids = torch.randint(0, 50, (1, 6))
        with fusedstab.use_backend("torch"):
            model(input_ids=ids)
    finally:
        fs_hf.register()
    assert len(calls) == 1  # one layer, one call


def test_exclude_attention_and_softcap_error():
    model = _make("llama")
    report = fusedstab.nn.replace_modules(model, exclude=["attention"], return_report=True)
    assert model.config._attn_implementation == "sdpa"
    assert any("excluded" in k and "LlamaAttention" in k for k in report.left), str(report)
    from fusedstab.integrations.transformers import fusedstab_attention_forward

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        fusedstab_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)
