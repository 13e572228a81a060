"""Log-probs of given tokens under a causal LM, without the model's (tokens x vocab) logits.

The decoder runs to its final hidden states only; the LM head is applied inside
`grpo_fast.kernels` (fused Triton on CUDA, chunked PyTorch on CPU), which never holds more than
a tile of logits. For Qwen2.5 (V = 151,936) and 8 x 1024 completion tokens the model's own
forward would allocate 1.2 G logits (5 GB in fp32) plus as much again for their gradient.

    seq = sequence_logprobs(model, input_ids, attention_mask, completion_mask)      # (B,)
    tok, ent = token_logprobs(model, input_ids, attention_mask, completion_mask)     # (B, T-1) x2

`token_logprobs` can run the decoder padding-free (`packed=True`, the default under
FlashAttention-2): the batch's real tokens are concatenated into one (1, total) row, positions
restarting at 0 for each sequence, so padding costs no compute anywhere in the model. Tested
against the padded forward by tests/test_packing.py.

`shared_prompt_logprobs` scores GRPO's G completions of a prompt with the prompt run once, not
G times: its KV cache is computed once per distinct prompt and indexed out to the completions,
so autograd sums the G completions' gradients into it: the same log-probs and gradients up to
float rounding (tests/test_shared_prompt.py). `group_logprobs` does the same for offline groups.

The trainers' entry points are `group_logprobs` (offline groups) and `completion_logps` /
`reference_logps` (online rollouts, at the rollout's sampling temperature); both accept a model
wrapped in DistributedDataParallel or a DeepSpeed engine, or sharded by FSDP2 (`as_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.distributed.fsdp import FSDPModule

from . import kernels


@dataclass
class LMHead:
    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    # Multiplier folded into the temperature: logits = (h W^T + b) * scale.
    scale: float
    module: torch.nn.Module  # the output embedding that holds weight and bias

    def apply(self, fn: Callable[[], Any]) -> Any:
        """`fn()`, which reads `weight`, run as the head module's forward: DeepSpeed ZeRO-3
        gathers a module's partitioned weight only around its forward (and again for its
        backward), so the kernel reads the whole (V, H) weight there; elsewhere it is a plain call."""
        return _run_as_forward(self.module, self.module, fn)


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
    return LMHead(weight=head.weight, bias=getattr(head, "bias", None), scale=scale, module=head)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final (normed) decoder hidden states (B, T, H): the model's forward minus the LM head."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model.get_decoder()(**kwargs)
    return out.last_hidden_state


def _shifted(model, input_ids, attention_mask, completion_mask):
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
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
    return head.apply(lambda: kernels.sequence_logprobs(
        hidden, head.weight, targets, mask.to(hidden.dtype if hidden.is_floating_point() else torch.float32),
        temperature=temperature / head.scale, normalize=normalize, bias=head.bias, backend=backend))


# Attention implementations that take explicit varlen boundaries (`cu_seq_lens_*`, computed
# here once instead of inferred from position_ids with a device sync in every layer) and run
# packed rows at the cost of the real tokens alone.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


@dataclass
class Packed:
    """A padded (B, T) batch as one padding-free (1, total) row."""

    input_ids: torch.Tensor      # (1, total) the attended tokens of every row, row after row
    position_ids: torch.Tensor   # (1, total) each row's positions, restarting per sequence
    index: torch.Tensor          # (B, T) long: column of (b, t) in the packed row (-1: padding)
    cu_seq_lens: torch.Tensor    # (S+1,) int32: sequence boundaries, S = rows with a real token
    max_length: int              # longest sequence


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor,
         position_ids: Optional[torch.Tensor] = None) -> Packed:
    """Concatenate the attended tokens (attention_mask 1) of each row into one row.

    Positions are `position_ids` at those tokens when given (the rollout's, counted from each
    row's first real token), else 0, 1, ... over each row's real tokens, which is what
    `generate` used for left-padded prompts. Rows without any real token are dropped (a zero-
    length entry in cu_seq_lens would make a varlen kernel see an empty sequence)."""
    real = attention_mask.bool()                                                 # (B, T)
    if position_ids is None:
        position_ids = real.long().cumsum(dim=1) - 1                             # (B, T)
    lengths = real.sum(dim=1)                                                    # (B,)
    index = torch.where(real, real.flatten().long().cumsum(0).view(real.shape) - 1, -1)
    bounds = torch.cat([lengths.new_zeros(1), lengths[lengths > 0].cumsum(0)])   # (S+1,)
    return Packed(input_ids=input_ids[real].unsqueeze(0),
                  position_ids=position_ids.expand_as(real)[real].unsqueeze(0),
                  index=index, cu_seq_lens=bounds.to(torch.int32),
                  max_length=int(lengths.max()))


def _check_segments(packed: Packed) -> None:
    """Without varlen kernels, transformers finds the packed sequences from position_ids alone
    (`masking_utils.find_packed_sequence_indices`: a new sequence wherever a position does not
    follow its predecessor by exactly 1). Refuse explicit position_ids that this would misread
    (a row that continues its predecessor's count, or jumps inside itself): attention would then
    cross sequences, or stop inside one, silently."""
    pos = packed.position_ids[0]                                                 # (total,)
    starts = torch.zeros_like(pos, dtype=torch.bool)
    starts[packed.cu_seq_lens[:-1].long()] = True
    # The first token opens a sequence whatever its position: compare from the second on.
    follows = pos[1:] - pos[:-1] == 1
    if bool((follows == starts[1:]).any()):
        raise ValueError("packed=True needs position_ids that count up by 1 inside each row and "
                         "restart at every row's first attended token (or position_ids=None)")


def packed_hidden_states(model, packed: Packed) -> torch.Tensor:
    """Final hidden states (1, total, H) of a packed batch.

    No attention mask: under FlashAttention-2/3 the sequence boundaries go in as cu_seq_lens
    (flash_attn_varlen_func); under SDPA/eager transformers builds a block-diagonal causal mask
    from the restarting position_ids, which is correct but (total x total): more than the padded
    batch's B x (T x T) mask, so those backends pack only on request."""
    kwargs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    if model.config._attn_implementation in VARLEN_ATTENTION:
        kwargs.update(cu_seq_lens_q=packed.cu_seq_lens, cu_seq_lens_k=packed.cu_seq_lens,
                      max_length_q=packed.max_length, max_length_k=packed.max_length)
    else:
        _check_segments(packed)
    return model.get_decoder()(**kwargs).last_hidden_state


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor, *, temperature: float = 1.0,
                   backend: str = "auto", position_ids: Optional[torch.Tensor] = None,
                   packed: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of the completion tokens.

    Only the positions where completion_mask is 1 go through the LM head (gathered into a dense
    (n, H) block), so prompt and padding cost no vocab work. Returns (logps, entropy), each
    (B, T-1) float32 aligned with targets input_ids[:, 1:], zero where masked.

    `packed` runs the decoder padding-free (see `pack`); None packs under FlashAttention-2/3,
    where a packed row costs attention over the real tokens only. Rollouts left-pad prompts and
    right-pad completions, so a micro-batch of 8 x (P + C) often holds half padding: the padded
    forward spends all its projections, MLPs and attention on it, the packed one none. The two
    agree up to float rounding when both see the same positions: the rollout's position_ids, or
    right-padded rows (without position_ids the padded forward counts left padding too)."""
    if packed is None:
        packed = model.config._attn_implementation in VARLEN_ATTENTION
    targets = input_ids[:, 1:]                                          # (B, T-1)
    sel = completion_mask[:, 1:].bool()                                 # (B, T-1)
    if packed:
        batch = pack(input_ids, attention_mask, position_ids)
        # Position t predicts token t+1: both must be attended tokens of the row.
        source = batch.index[:, :-1][sel]                               # (n,)
        if bool((source < 0).any() | (batch.index[:, 1:][sel] < 0).any()):
            raise ValueError("completion_mask marks a token that attention_mask (or its "
                             "predecessor's) leaves out")
        hidden = packed_hidden_states(model, batch)[0, source]          # (n, H)
    else:
        hidden = hidden_states(model, input_ids, attention_mask, position_ids)[:, :-1][sel]  # (n, H)
    return scored_logprobs(model, hidden, targets, sel, temperature=temperature, backend=backend)


def scored_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, sel: torch.Tensor, *,
                    temperature: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head on the scored positions only: hidden (n, H) of the n True entries of sel
    (B, T), targets (B, T). Returns (logps, entropy), (B, T) float32, zero where sel is False;
    entropy is detached (a metric)."""
    head = lm_head(model)
    logp_sel, ent_sel = head.apply(lambda: kernels.token_logprobs(
        hidden, head.weight, targets[sel], temperature=temperature / head.scale,
        bias=head.bias, backend=backend, return_entropy=True))           # (n,), (n,)
    zeros = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device)
    return zeros.masked_scatter(sel, logp_sel), zeros.masked_scatter(sel, ent_sel.detach())


def shared_prompt_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                           temperature: float = 1.0,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies (N, C) of completions, each distinct prompt run once.

    prompt_ids, prompt_mask: (N, P) left-padded, as a Rollout holds them (a prompt repeated on
    its G rows); completion_ids, completion_mask: (N, C). Returns (logps, entropy), (N, C)
    float32, zero where completion_mask is 0: what `token_logprobs` gives for the completion
    columns of the concatenated rows, up to float rounding.

    The decoder runs on the U distinct prompts with its KV cache on, (U, P); the cache and the
    prompts' last hidden states are then gathered out to the N rows (index_select, whose
    backward sums the rows' gradients into their prompt), and the completions run against that
    cache, (N, C-1): the last completion token is only a target. GRPO's N = U*G rows of P + C
    tokens become U*P + N*(C-1) tokens of decoder work: a 100-token prompt with G = 8
    completions of 300 tokens costs 2,500 token-forwards instead of 3,200 (activation memory
    shrinks alike), and prompts as long as the completions halve it. Dropout, if the model has
    any, draws one mask per prompt rather than per row. Needs the model's KV cache under
    autograd, which HF turns off with gradient checkpointing: use `token_logprobs` there."""
    # Distinct (ids, mask) prompt rows; `inverse` maps each of the N rows to its prompt.
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)            # (N, 2P)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)                 # (U, 2P), (N,)
    P = prompt_ids.size(1)
    u_ids, u_mask = distinct[:, :P], distinct[:, P:]                                  # (U, P) x2
    u_pos = (u_mask.cumsum(dim=1) - 1).clamp(min=0)                                   # (U, P)
    decoder = model.get_decoder()
    out = decoder(input_ids=u_ids, attention_mask=u_mask, position_ids=u_pos, use_cache=True)
    cache = out.cache
    cache.reorder_cache(inverse)                                                      # U -> N rows
    first = out.last_hidden_state[:, -1].index_select(0, inverse)                     # (N, H)
    C = completion_ids.size(1)
    if C > 1:
        # Positions continue each row's prompt count, as the rollout's did.
        pos = u_pos[:, -1:].index_select(0, inverse) + torch.arange(1, C, device=u_pos.device)  # (N, C-1)
        mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)              # (N, P+C-1)
        rest = decoder(input_ids=completion_ids[:, :-1], attention_mask=mask, position_ids=pos,
                       cache=cache, use_cache=True).last_hidden_state                 # (N, C-1, H)
        hidden = torch.cat([first.unsqueeze(1), rest], dim=1)                         # (N, C, H)
    else:
        hidden = first.unsqueeze(1)                                                   # (N, 1, H)
    # hidden[:, t] predicts completion_ids[:, t].
    sel = completion_mask.bool()                                                      # (N, C)
    return scored_logprobs(model, hidden[sel], completion_ids, sel, temperature=temperature,
                           backend=backend)                                           # (N, C) x2


def checkpoints_activations(model) -> bool:
    """Whether the model recomputes activations in backward (transformers 5 renamed the flag)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Right-padded (N, T) prompt + completion rows -> left-padded prompts (N, P) with their mask
    and right-padded completions (N, C) with theirs: the layout `shared_prompt_logprobs` takes.
    A row's completion starts at its first completion_mask column; None when a row has no
    prompt token left there (truncation), whose first token nothing could predict."""
    N, T = input_ids.shape
    starts = completion_mask.int().argmax(dim=1)                                      # (N,)
    ends = attention_mask.sum(dim=1)                                                  # (N,)
    if bool((starts == 0).any()):
        return None
    P, C = int(starts.max()), int((ends - starts).max())
    src = starts[:, None] - P + torch.arange(P, device=input_ids.device)              # (N, P)
    prompt_mask = (src >= 0).long()
    prompt_ids = torch.where(prompt_mask.bool(), input_ids.gather(1, src.clamp(min=0)), 0)
    cols = starts[:, None] + torch.arange(C, device=input_ids.device)                 # (N, C)
    inside = cols < ends[:, None]
    cols = cols.clamp(max=T - 1)
    completion_ids = torch.where(inside, input_ids.gather(1, cols), 0)
    completion = (inside & completion_mask.gather(1, cols).bool()).long()
    return prompt_ids, prompt_mask, completion_ids, completion


def as_forward(model, fn: Callable[[torch.nn.Module], Any]) -> Any:
    """`fn(model)`, where `model` may be wrapped by DistributedDataParallel or a DeepSpeed engine,
    or sharded by FSDP2: then `fn` runs *as the model's forward* (the wrapper's, or the FSDP2
    root's), so that each wrapper's forward hooks run around it. DDP arms its
    gradient all-reduce for the backward only in its forward (calling the inner model directly
    would let ranks drift apart); FSDP2 gathers the root's parameters (embeddings, final norm,
    LM head) only in the root's forward, and keeps them for its backward, so `fn` reaches the
    decoder and the whole LM head for the kernel, which no wrapper exposes."""
    inner = unwrapped(model)
    if inner is model and not isinstance(model, FSDPModule):
        return fn(model)
    return _run_as_forward(model, inner, lambda: fn(inner))


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper or a DeepSpeed engine (whose forward
    calls it), else `model` itself (an FSDP2 root is the model)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        return model.module
    return model


def _run_as_forward(outer: torch.nn.Module, inner: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """`fn()` as `inner`'s forward, called through `outer` (inner itself or a wrapper whose forward
    calls it), so every hook of both runs around it. An instance attribute shadows the class's
    forward; one already there (a hook's wrapper) is put back after."""
    saved = inner.__dict__.get("forward")
    inner.forward = fn
    try:
        return outer()
    finally:
        del inner.forward
        if saved is not None:
            inner.forward = saved


def group_logprobs(model, batch: dict[str, torch.Tensor], *, normalize: bool = False,
                   backend: str = "auto", shared_prompt: bool = False) -> torch.Tensor:
    """Sequence log-probs (B, K) of a padded batch of groups (grpo_fast.data.GroupCollator);
    padded group slots (group_mask False) are never run and read 0. `model` may be wrapped in
    DDP or a DeepSpeed engine, or sharded by FSDP2 (`as_forward`).

    `shared_prompt` runs a group's prompt once for its K completions (`shared_prompt_logprobs`),
    unless the model checkpoints gradients or a row's prompt was truncated away entirely."""
    return as_forward(model, lambda m: _group_logprobs(m, batch, normalize, backend, shared_prompt))


def _group_logprobs(model, batch, normalize, backend, shared_prompt) -> torch.Tensor:
    sel = batch["group_mask"].bool()                                     # (B, K)
    ids, attn, comp = batch["input_ids"][sel], batch["attention_mask"][sel], batch["completion_mask"][sel]
    rows = split_rows(ids, attn, comp) if shared_prompt and not checkpoints_activations(model) else None
    if rows is None:
        seq = sequence_logprobs(model, ids, attn, comp, normalize=normalize, backend=backend)  # (n,)
    else:
        logps, _ = shared_prompt_logprobs(model, *rows, backend=backend)                  # (n, C)
        seq = logps.sum(dim=1)
        if normalize:
            seq = seq / rows[3].sum(dim=1).clamp(min=1)
    out = torch.zeros(sel.shape, dtype=seq.dtype, device=seq.device)
    return out.masked_scatter(sel, seq)                                  # (B, K)


def completion_logps(model, roll, *, backend: str = "auto", shared_prompt: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies (N, C) of a rollout's (grpo_fast.rollout.Rollout)
    completion tokens, zero after EOS, at the temperature the rollout was sampled at (read from
    it, so they describe the distribution that was sampled). `model` may be wrapped in DDP or a
    DeepSpeed engine, or sharded by FSDP2.

    `shared_prompt` runs each distinct prompt once (`shared_prompt_logprobs`), unless the model
    checkpoints gradients (HF then refuses the KV cache it needs)."""
    return as_forward(model, lambda m: _completion_logps(m, roll, backend, shared_prompt))


def _completion_logps(model, roll, backend, shared_prompt) -> tuple[torch.Tensor, torch.Tensor]:
    if shared_prompt and not checkpoints_activations(model):
        return shared_prompt_logprobs(
            model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask,
            temperature=roll.temperature, backend=backend)                             # (N, C) x2
    logps, entropy = token_logprobs(
        model, roll.input_ids, roll.attention_mask, roll.loss_mask, temperature=roll.temperature,
        backend=backend, position_ids=roll.position_ids)                             # (N, P+C-1) x2
    # Column t scores input_ids[:, t+1]: the completion starts at column P-1. Copies, not views:
    # an FSDP2 root's backward hook must not hang on a view that an in-place op could rebase.
    start = roll.prompt_ids.size(1) - 1
    return logps[:, start:].clone(), entropy[:, start:].clone()                       # (N, C) x2


@torch.no_grad()
def reference_logps(model, ref_model, roll, *, backend: str = "auto", shared_prompt: bool = True
                    ) -> torch.Tensor:
    """(N, C) log-probs under the reference policy: `ref_model` (the frozen copy of full
    fine-tuning) when given, else `model` (a PeftModel) with its LoRA adapter switched off, which
    needs no second copy of the weights."""
    kwargs = dict(backend=backend, shared_prompt=shared_prompt)
    if ref_model is not None:
        return completion_logps(ref_model, roll, **kwargs)[0]
    # No backward follows, so a wrapper has nothing to arm: use the model inside it (the wrapper
    # has no disable_adapter).
    model = unwrapped(model)
    with model.disable_adapter():
        return completion_logps(model, roll, **kwargs)[0]
