"""Model-level log-probs: the LM head's post-processing is honoured exactly or refused."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_fast import logprobs


def tiny_llama(**extra):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, **extra)
    return LlamaForCausalLM(cfg).eval()


def batch():
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    return ids, mask, completion


def model_logps(model, ids, temperature):
    """What the model's own forward gives: full logits, log-softmax, gather."""
    logits = model(ids).logits[:, :-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_token_logprobs_match_the_models_logits(backend):
    model = tiny_llama()
    ids, mask, completion = batch()
    with torch.no_grad():
        logps, entropy = logprobs.token_logprobs(model, ids, mask, completion, temperature=0.7,
                                                 backend=backend)
        expected = model_logps(model, ids, 0.7) * completion[:, 1:]
        seq = logprobs.sequence_logprobs(model, ids, mask, completion, temperature=0.7, backend=backend)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq, expected.sum(-1), rtol=1e-5, atol=1e-5)
    assert (entropy[completion[:, 1:] == 0] == 0).all() and (entropy[completion[:, 1:] == 1] > 0).all()


def test_logit_scale_is_folded_into_the_temperature():
    model = tiny_llama()
    ids, mask, completion = batch()
    model.config.logit_scale = 0.5  # Cohere-style: logits = (h W^T) * 0.5
    with torch.no_grad():
        logps, _ = logprobs.token_logprobs(model, ids, mask, completion, temperature=1.0, backend="naive")
        # Scaling the logits by 0.5 is the same as temperature 2.
        expected = model_logps(model, ids, 2.0) * completion[:, 1:]
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert logprobs.lm_head(model).scale == 0.5
    del model.config.logit_scale
    model.config.logits_scaling = 4.0  # Granite-style: logits / 4
    assert logprobs.lm_head(model).scale == 0.25


def test_final_logit_softcapping_is_refused():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    ids, mask, completion = batch()
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        logprobs.token_logprobs(model, ids, mask, completion)
