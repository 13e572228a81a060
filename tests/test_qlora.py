"""QLoRA plumbing on CPU: 4-bit and 8-bit bitsandbytes loading through load_model_and_tokenizer,
quantized forward, LoRA backward and optimizer steps (torch and bitsandbytes 8-bit AdamW),
adapter save / reload with plain peft, attention choice, gradient checkpointing, and the frozen
LM head under the fused log-prob kernel (no V x H gradient).

bitsandbytes >= 0.45 runs all of this on CPU: NF4/FP4 Linear4bit, LLM.int8 Linear8bitLt and the
8-bit (paged) optimizers. The models are the shipped tiny Llama and Qwen2 (biased q/k/v)
(configs/models/tiny-*.json), built with random weights and saved once, since a random-weight
model cannot be loaded quantized directly.

bitsandbytes builds 4-bit linears differently on a CPU with AVX512-BF16 (a packed inference
layout, which grpo_fast.modeling.unpack_cpu_4bit_layout turns off), so every 4-bit test runs on
both kinds of CPU: this one, and the other simulated (`cpu_kind`).

    pytest tests/test_qlora.py
"""

from __future__ import annotations

import logging
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fast import logprobs, plan
from grpo_fast.config import ConfigError, config_from_dict
from grpo_fast import BNB_CPU_OPS_LOGGER, BNB_KERNELS_HINT
from grpo_fast.modeling import (
    load_base_model,
    load_model_and_tokenizer,
    resolve_attn_implementation,
    unpack_cpu_4bit_layout,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "models" / "tiny-llama.json")
TINY_QWEN2 = str(REPO / "configs" / "models" / "tiny-qwen2.json")
CPU = torch.device("cpu")
SIMULATED = "avx512bf16-simulated"


both_cpu_kinds = pytest.mark.usefixtures("cpu_kind")


def save_base(tmp_path_factory, model_config: str) -> str:
    """A random-weight model built from `model_config`, saved as a checkpoint with its
    byte-level tokenizer."""
    path = tmp_path_factory.mktemp(Path(model_config).stem)
    model, tokenizer = load_base_model(make_cfg(model_path=model_config), CPU)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_base(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def qwen2_base_dir(tmp_path_factory) -> str:
    return save_base(tmp_path_factory, TINY_QWEN2)


def make_cfg(**overrides):
    data = {"mode": "offline", "dataset_path": "unused.jsonl", "seed": 0}
    data.update(overrides)
    return config_from_dict(data)


def qlora_cfg(base_dir: str, **overrides):
    quantization = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                    "compute_dtype": "bfloat16", **overrides.pop("quantization", {})}
    return make_cfg(model_path=base_dir, quantization=quantization, **overrides)


def batch(seed: int = 0, rows: int = 3, length: int = 20):
    """input_ids, attention_mask (first row left-padded) and completion_mask (second half)."""
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[0, :4] = 0
    completion_mask = torch.zeros(rows, length)
    completion_mask[:, length // 2:] = 1
    return ids, attention_mask, completion_mask


def loss_of(model, seed: int = 0) -> torch.Tensor:
    logps, _ = logprobs.token_logprobs(model, *batch(seed), backend="chunked")
    return -logps.sum() / batch(seed)[2][:, 1:].sum()


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def decoder_linears(model):
    return {n: m for n, m in model.named_modules()
            if n.endswith(("q_proj.base_layer", "k_proj.base_layer", "v_proj.base_layer", "o_proj.base_layer",
                           "gate_proj.base_layer", "up_proj.base_layer", "down_proj.base_layer"))}


@both_cpu_kinds
def test_4bit_load_quantizes_the_decoder_but_not_the_lm_head(base_dir):
    # bfloat16 as on a GPU, so the load's dtypes can be held against the planner's.
    cfg = qlora_cfg(base_dir, dtype="bfloat16")
    model, _ = load_model_and_tokenizer(cfg, CPU)
    linears = decoder_linears(model)
    assert len(linears) == 2 * 7
    for module in linears.values():
        assert isinstance(module, bnb.nn.Linear4bit)
        assert module.weight.quant_type == "nf4" and module.weight.quant_state.nested  # double quant
        assert module.compute_dtype == torch.bfloat16
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and not isinstance(head, bnb.nn.Linear4bit)
    assert head.weight.dtype == torch.bfloat16 and not head.weight.requires_grad
    # The base is only frozen (no prepare_model_for_kbit_training): every unquantized weight
    # (embeddings, LM head, norms) keeps the model dtype, nothing of the base trains, and only
    # peft's adapters (fp32) do.
    adapters = lora_params(model)
    unquantized = {n: p for n, p in model.named_parameters()
                   if n not in adapters and not isinstance(p, bnb.nn.Params4bit)}
    assert unquantized and {p.dtype for p in unquantized.values()} == {torch.bfloat16}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in adapters)
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    # The planner's precision assumptions (grpo_fast.plan.precision) hold for this load path:
    # the dtype of the unquantized embeddings / LM head and of the stream, and fp32 adapters.
    expected = plan.precision(cfg)
    assert model.get_input_embeddings().weight.element_size() == expected.weight == expected.stream == 2
    assert {p.element_size() for p in adapters.values()} == {expected.lora}
    with torch.no_grad():
        hidden = model(input_ids=batch()[0], output_hidden_states=True).hidden_states
    assert {h.dtype for h in hidden} == {torch.bfloat16}


@both_cpu_kinds
def test_quantized_forward_tracks_the_full_precision_model(base_dir):
    full, _ = load_model_and_tokenizer(make_cfg(model_path=base_dir), CPU, trainable=False)
    quantized, _ = load_model_and_tokenizer(qlora_cfg(base_dir), CPU, trainable=False)
    with torch.no_grad():
        ref, _ = logprobs.token_logprobs(full, *batch(), backend="chunked")
        got, _ = logprobs.token_logprobs(quantized, *batch(), backend="chunked")
    scored = batch()[2][:, 1:].bool()
    assert torch.isfinite(got).all()
    # NF4 + bf16 compute perturbs the log-probs (~-5.6 nats per token here) by a few hundredths.
    assert (got - ref)[scored].abs().mean() < 0.05
    assert not torch.equal(got, ref)


@both_cpu_kinds
def test_lora_backward_reaches_only_the_adapters_and_a_step_moves_them(base_dir):
    model, _ = load_model_and_tokenizer(qlora_cfg(base_dir), CPU)
    model.train()
    adapters = lora_params(model)
    assert adapters and all(p.requires_grad for p in adapters.values())
    loss_of(model).backward()
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # lora_B starts at zero, so only it gets a non-zero gradient on the first step.
    assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
    packed = {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}
    before = {n: p.detach().clone() for n, p in adapters.items()}
    loss_before = loss_of(model).item()
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-2)
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in adapters.items() if "lora_B" in n)
    assert all(torch.equal(packed[n], m.weight) for n, m in decoder_linears(model).items())
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step()
    assert loss_of(model).item() < loss_before


@both_cpu_kinds
def test_adapter_round_trip_with_plain_peft(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = qlora_cfg(base_dir)
    model, _ = load_model_and_tokenizer(cfg, CPU)
    optimizer = torch.optim.AdamW(lora_params(model).values(), lr=1e-2)
    for seed in range(3):
        optimizer.zero_grad()
        loss_of(model, seed).backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        trained, _ = logprobs.token_logprobs(model, *batch(7), backend="chunked")

    # A fresh 4-bit base loaded the way any peft user would, then the adapter on top.
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16,
                                               llm_int8_skip_modules=["lm_head"]))
    # On an AVX512-BF16 CPU, bitsandbytes would score this base with its packed bf16 kernel: held
    # to the layout the adapter was trained with, the comparison is of the adapter alone.
    unpack_cpu_4bit_layout(base)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        again, _ = logprobs.token_logprobs(reloaded, *batch(7), backend="chunked")
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-5)
    # The adapter changed the model: the base alone scores differently.
    with reloaded.disable_adapter(), torch.no_grad():
        base_only, _ = logprobs.token_logprobs(reloaded, *batch(7), backend="chunked")
    assert (base_only - trained).abs().max() > 1e-3


def test_8bit_load_runs_and_trains_on_cpu(base_dir):
    cfg = make_cfg(model_path=base_dir, quantization={"load_in_8bit": True})
    model, _ = load_model_and_tokenizer(cfg, CPU)
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in decoder_linears(model).values())
    assert model.get_output_embeddings().weight.dtype == torch.float32
    loss = loss_of(model)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in lora_params(model).items())


def test_flash_attention_2_on_cpu_is_a_config_error_naming_what_is_missing(base_dir):
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs .*flash_attn.*CUDA"):
        resolve_attn_implementation("flash_attention_2", CPU, torch.bfloat16)
    with pytest.raises(ConfigError, match="a CUDA device"):
        load_model_and_tokenizer(qlora_cfg(base_dir, attn_implementation="flash_attention_2"), CPU)


def test_auto_attention_is_sdpa_on_cpu_with_a_logged_reason(base_dir, caplog):
    impl, reason = resolve_attn_implementation("auto", CPU, torch.float32)
    assert impl == "sdpa" and "CUDA" in reason
    with caplog.at_level(logging.INFO, logger="grpo_fast.modeling"):
        model, _ = load_model_and_tokenizer(qlora_cfg(base_dir, attn_implementation="auto"), CPU)
    assert model.config._attn_implementation == "sdpa"
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("attention: sdpa (FlashAttention-2 unavailable") for m in logged)


@both_cpu_kinds
def test_gradient_checkpointing_with_lora_gives_the_same_gradients(base_dir):
    grads = {}
    for checkpointing in (False, True):
        model, _ = load_model_and_tokenizer(qlora_cfg(base_dir, gradient_checkpointing=checkpointing), CPU)
        model.train()
        layers = model.get_base_model().model.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        loss_of(model).backward()
        grads[checkpointing] = {n: p.grad for n, p in lora_params(model).items()}
    assert all(g is not None for g in grads[True].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6)


@both_cpu_kinds
def test_bitsandbytes_8bit_optimizers_step_on_cpu(base_dir, tmp_path):
    """Both ways the trainers build them: the offline Trainer (TrainingArguments.optim) and the
    online loop (grpo_fast.optim.build_optimizer)."""
    from transformers import Trainer

    from grpo_fast.optim import build_optimizer
    from grpo_fast.offline import training_arguments

    # r = 64 makes every adapter matrix >= 4096 elements, the size from which bitsandbytes keeps
    # 8-bit states (smaller tensors get fp32 states).
    cfg = qlora_cfg(base_dir, output_dir=str(tmp_path), lora={"r": 64, "alpha": 128}, learning_rate=1e-3)
    model, _ = load_model_and_tokenizer(cfg, CPU)
    adapters = lora_params(model)
    for optim in ("adamw_8bit", "paged_adamw_8bit"):
        cfg_optim = config_from_dict({**cfg.to_dict(), "optim": optim})
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_arguments(cfg_optim), model)
        assert optimizer_cls is bnb.optim.AdamW and kwargs["optim_bits"] == 8
        assert kwargs["is_paged"] == (optim == "paged_adamw_8bit")
        for optimizer in (optimizer_cls(adapters.values(), **kwargs), build_optimizer(cfg_optim, model)):
            assert optimizer.args.optim_bits == 8 and optimizer.is_paged == (optim == "paged_adamw_8bit")
            model.zero_grad()
            loss_before = loss_of(model)
            loss_before.backward()
            before = {n: p.detach().clone() for n, p in adapters.items()}
            optimizer.step()
            assert all(not torch.equal(before[n], p) for n, p in adapters.items() if "lora_B" in n), optim
            states = [optimizer.state[p] for p in adapters.values()]
            assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)
            assert loss_of(model).item() < loss_before.item(), optim


class _AllocatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@both_cpu_kinds
def test_frozen_lm_head_gets_no_vocab_sized_gradient(base_dir):
    model, _ = load_model_and_tokenizer(qlora_cfg(base_dir), CPU)
    model.train()
    weight = logprobs.lm_head(model).weight
    assert not weight.requires_grad
    seq = logprobs.sequence_logprobs(model, *batch(), backend="chunked")
    with _AllocatedShapes() as mode:
        (-seq.sum()).backward()
    assert weight.grad is None
    # No op in the backward produced a V x H tensor (the LM head is tied to the embeddings here,
    # so that also rules out an embedding gradient); the hidden-state gradient did flow.
    assert tuple(weight.shape) not in mode.shapes
    assert any(len(s) >= 2 and s[-1] == weight.shape[1] for s in mode.shapes)
    assert all(p.grad is not None for p in lora_params(model).values())


def linear4bits(model) -> dict[str, bnb.nn.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_qwen2_qlora_scores_and_trains_through_one_4bit_path(qwen2_base_dir, cpu_kind):
    """Training steps on Qwen2 (biased q/k/v) with an eval-mode no-grad forward in between: what
    rollouts and evals run, and the forward at which bitsandbytes on an AVX512-BF16 CPU would
    repack its weights and switch every later forward, training ones too, to another kernel. At
    each step the no-grad log-probs, and the training forward and backward after it, must equal
    the training forward and backward before it."""
    model, _ = load_model_and_tokenizer(qlora_cfg(qwen2_base_dir), CPU)
    linears = linear4bits(model)
    assert len(linears) == 2 * 7
    assert all((m.bias is not None) == n.endswith(("q_proj.base_layer", "k_proj.base_layer", "v_proj.base_layer"))
               for n, m in linears.items())
    layout = {n: (m.weight.shape, m.weight.quant_state.nested) for n, m in linears.items()}
    adapters = lora_params(model)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-2)

    def train_forward_backward(seed):
        model.train()
        optimizer.zero_grad()
        logps, _ = logprobs.token_logprobs(model, *batch(seed), backend="chunked")
        loss = -logps.sum() / batch(seed)[2][:, 1:].sum()
        assert torch.isfinite(loss), (cpu_kind, seed)
        loss.backward()
        return logps.detach(), {n: p.grad.clone() for n, p in adapters.items()}

    for seed in range(3):
        logps, grads = train_forward_backward(seed)
        model.eval()
        with torch.no_grad():
            scored, _ = logprobs.token_logprobs(model, *batch(seed), backend="chunked")
        torch.testing.assert_close(scored, logps, rtol=0, atol=1e-6)
        logps_after, grads_after = train_forward_backward(seed)
        torch.testing.assert_close(logps_after, logps, rtol=0, atol=1e-6)
        torch.testing.assert_close(grads_after, grads, rtol=0, atol=1e-6)
        optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in adapters.items())
    # The weights keep the layout they were loaded (and are saved) in.
    assert layout == {n: (m.weight.shape, m.weight.quant_state.nested) for n, m in linears.items()}


def test_turning_the_packed_layout_off_is_logged_once_where_it_was_on(base_dir, cpu_kind, caplog):
    with caplog.at_level(logging.INFO, logger="grpo_fast.modeling"):
        model, _ = load_base_model(qlora_cfg(base_dir), CPU)
    logged = [r.getMessage() for r in caplog.records if "packed CPU 4-bit layout" in r.getMessage()]
    # has_avx512bf16 as imported by bitsandbytes.functional: this CPU's own answer, unpatched.
    was_on = cpu_kind == SIMULATED or bnb.functional.has_avx512bf16()
    assert logged == (["bitsandbytes: packed CPU 4-bit layout (AVX512-BF16) turned off on 14 linears, so "
                       "every forward dequantizes the same weights"] if was_on else [])
    assert not any(m.support_avx512bf16_for_cpu for m in linear4bits(model).values())


def test_a_weight_already_packed_is_unpacked_to_its_saved_layout(base_dir):
    model, _ = load_base_model(qlora_cfg(base_dir), CPU)
    linear = model.model.layers[0].mlp.down_proj
    state = linear.weight.quant_state
    saved = linear.weight.data.clone()
    dequantized = bnb.functional.dequantize_4bit(saved, state)
    # What Linear4bit.forward does on an AVX512-BF16 CPU at its first eval-mode no-grad forward.
    linear.weight.data, linear.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(saved.clone(), state)
    assert linear.weight.shape != saved.shape
    assert unpack_cpu_4bit_layout(model) == 1
    assert not linear.weight.quant_state.packing_format_for_cpu and linear.weight.quant_state.nested
    assert torch.equal(linear.weight.data, saved)
    # The absmax scales went through bf16 in the packed layout: equal to bf16 precision.
    torch.testing.assert_close(bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state),
                               dequantized, rtol=1e-2, atol=0)


def test_the_kernels_install_hint_of_bitsandbytes_is_dropped(caplog):
    import bitsandbytes.backends.cpu.ops as cpu_ops

    # The message is still bitsandbytes' own (an upgrade that rewords it shows here).
    assert BNB_KERNELS_HINT in Path(cpu_ops.__file__).read_text()
    ops_logger = logging.getLogger(BNB_CPU_OPS_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_OPS_LOGGER):
        ops_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                           "you already `pip install kernels` and the kernels >= 0.11.1",
                           ImportError("No module named 'kernels'"))
        ops_logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
