"""Log-probs of given tokens under a causal LM, without the model's (tokens x vocab) logits.

The decoder runs to its final hidden states only; the LM head is applied inside
`grpo_fast.kernels` (fused Triton on CUDA, chunked PyTorch on CPU), which never holds more than
a tile of logits. For Qwen2.5 (V = 151,936) and 8 x 1024 completion tokens the model's own
forward would allocate 1.2 G logits (5 GB in fp32) plus as much again for their gradient.

    seq = sequence_logprobs(model, input_ids, attention_mask, completion_mask)      # (B,)
    tok, ent = token_logprobs(model, input_ids, attention_mask, completion_mask)     # (B, T-1) x2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import kernels


@dataclass
class LMHead:
    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    # Multiplier folded into the temperature: logits = (h W^T + b) * scale.
    scale: float


def lm_head(model) -> LMHead:
    """The LM head's weight (tied embeddings and PEFT wrappers included) and any logit scale.

    Architectures that post-process logits are handled exactly or refused: a multiplicative
    logit scale (Cohere `logit_scale`, Granite `logits_scaling`) is folded into the temperature;
    final-logit soft-capping (Gemma 2/3) is not a linear map, so the kernel cannot honour it and
    we refuse rather than compute silently wrong log-probs."""
    config = model.config
    text_config = getattr(config, "get_text_config", lambda: config)()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap:
        raise ValueError(f"{type(model).__name__} applies final_logit_softcapping={softcap} to its "
                         "logits, which the fused log-prob kernel does not support")
    scale = 1.0
    if getattr(text_config, "logit_scale", None):
        scale *= float(text_config.logit_scale)
    if getattr(text_config, "logits_scaling", None):
        scale /= float(text_config.logits_scaling)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) weight")
    return LMHead(weight=head.weight, bias=getattr(head, "bias", None), scale=scale)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final (normed) decoder hidden states (B, T, H): the model's forward minus the LM head."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model.get_decoder()(**kwargs)
    return out.last_hidden_state


def _shifted(model, input_ids, attention_mask, completion_mask, position_ids=None):
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)  # (B, T, H)
    # Position t predicts token t+1: drop the last hidden state and the first target.
    return hidden[:, :-1], input_ids[:, 1:], completion_mask[:, 1:]


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor, *, temperature: float = 1.0,
                      normalize: bool = False, backend: str = "auto") -> torch.Tensor:
    """Sum (mean with `normalize`) of log pi(y_t | y_<t) over completion tokens.

    input_ids, attention_mask, completion_mask: (B, T); completion_mask is 1 on the tokens whose
    log-probs count (the completion), 0 on prompt and padding. Returns (B,) float32."""
    hidden, targets, mask = _shifted(model, input_ids, attention_mask, completion_mask)
    head = lm_head(model)
    return kernels.sequence_logprobs(
        hidden, head.weight, targets, mask.to(hidden.dtype if hidden.is_floating_point() else torch.float32),
        temperature=temperature / head.scale, normalize=normalize, bias=head.bias, backend=backend)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor, *, temperature: float = 1.0,
                   backend: str = "auto", position_ids: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the completion tokens.

    Only the positions where completion_mask is 1 go through the LM head (gathered into a dense
    (n, H) block), so prompt and padding cost no vocab work. Returns (logps, entropy), each
    (B, T-1) float32 aligned with targets input_ids[:, 1:], zero where masked."""
    hidden, targets, mask = _shifted(model, input_ids, attention_mask, completion_mask, position_ids)
    head = lm_head(model)
    sel = mask.bool()                                                   # (B, T-1)
    logp_sel, ent_sel = kernels.token_logprobs(
        hidden[sel], head.weight, targets[sel], temperature=temperature / head.scale,
        bias=head.bias, backend=backend, return_entropy=True)            # (n,), (n,)
    logps = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device)
    logps = logps.masked_scatter(sel, logp_sel)
    entropy = entropy.masked_scatter(sel, ent_sel.detach())
    return logps, entropy
