"""The VRAM planner (grpo_fast.plan): shapes, hand-computed byte counts, the per-layer activation
formula against what autograd really saves, the fit search, --gpu-memory parsing, the CLI and
the shipped presets' header estimates.

    pytest tests/test_plan.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from grpo_fast import logprobs
from grpo_fast.cli import main
from grpo_fast.config import ConfigError, config_from_dict, load_config
from grpo_fast.plan import (
    CUDA_OVERHEAD,
    ENGINE_FIXED,
    FIT_SEARCH_MAX,
    GiB,
    HUB_SHAPES,
    SHAPES_DIR,
    estimate,
    fit_search,
    layer_activation_bytes_per_token,
    lora_param_count,
    model_shape,
    parse_memory,
    plan_command,
    shape_from_config,
    weight_bytes,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"qwen2.5-0.5b-gsm8k-qlora.yaml": 8 * GiB,
           "qwen2.5-1.5b-gsm8k-qlora.yaml": 12 * GiB,
           "qwen2.5-1.5b-gsm8k-qlora-vllm.yaml": 12 * GiB,
           "qwen2.5-3b-gsm8k-qlora.yaml": 24 * GiB}

# Parameter counts the model authors publish.
PUBLISHED_PARAMS = {"qwen2.5-0.5b.json": 0.49e9, "qwen2.5-1.5b.json": 1.54e9, "qwen2.5-3b.json": 3.09e9,
                    "qwen2.5-7b.json": 7.61e9, "llama-3.2-1b.json": 1.24e9, "llama-3.2-3b.json": 3.21e9}


def online_cfg(**overrides):
    data = {"mode": "online", "model_path": "Qwen/Qwen2.5-1.5B-Instruct",
            "online": {"dataset_name": "openai/gsm8k", "num_generations": 8,
                       "max_prompt_length": 256, "max_completion_length": 512},
            "quantization": {"load_in_4bit": True}, "gradient_checkpointing": True, "batch_size": 1}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return config_from_dict(data)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_shipped_shapes_count_parameters_like_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = SHAPES_DIR / name
    shape = model_shape(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(path.read_text())))
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert shape.num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)
    # The planner's dict reading agrees with transformers' own config object.
    assert shape_from_config(model.config) == shape


def test_tiny_shape_by_hand():
    shape = model_shape(str(SHAPES_DIR / "tiny-llama.json"))
    # embeddings 259 x 64 (tied) + 2 layers x (4 x 64 x 64 attention + 3 x 64 x 192 MLP + 2 norms)
    # + the final norm.
    assert shape.num_params == 259 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64) + 64 == 123_392
    assert (shape.q_dim, shape.kv_dim, shape.head_dim) == (64, 64, 32)


def test_hub_ids_map_to_shipped_shapes_and_unknown_models_fail_clearly(tmp_path, monkeypatch):
    # From any directory: the shipped shapes are package data, not paths under the checkout.
    monkeypatch.chdir(tmp_path)
    assert model_shape("Qwen/Qwen2.5-1.5B-Instruct") == model_shape(str(SHAPES_DIR / "qwen2.5-1.5b.json"))
    assert model_shape("meta-llama/Llama-3.2-3B") == model_shape(str(SHAPES_DIR / "llama-3.2-3b.json"))
    assert all((SHAPES_DIR / f).is_file() for f in HUB_SHAPES.values())
    with pytest.raises(ConfigError, match=r"no shape for 'acme/unknown-13b'.*shipped: .*qwen/qwen2.5-1.5b"):
        model_shape("acme/unknown-13b")


def test_local_directories_need_a_config_json(tmp_path):
    with pytest.raises(ConfigError, match="without config.json"):
        model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text((SHAPES_DIR / "qwen2.5-0.5b.json").read_text())
    assert model_shape(str(tmp_path)).num_params == 494_032_768


# --------------------------------------------------------------------------------------------
# Hand-computed byte counts
# --------------------------------------------------------------------------------------------


def test_nf4_weight_bytes_by_hand():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    # One linear of N weights: N/2 packed bytes + one uint8 absmax per 64 weights + one fp32
    # per 256 absmax (double quantization).
    def nf4(n):
        blocks = -(-n // 64)
        return n // 2 + blocks + 4 * -(-blocks // 256)
    assert nf4(1536 * 1536) == 1_217_088
    layer = 2 * nf4(1536 * 1536) + 2 * nf4(1536 * 256) + 3 * nf4(1536 * 8960)
    assert layer == 24_138_912
    # Embeddings (tied), 57 norms and the q/k/v biases stay unquantized, in the model dtype
    # (bf16; the base is only frozen, not upcast by prepare_model_for_kbit_training).
    unquantized = 151_936 * 1536 + 57 * 1536 + 28 * (1536 + 2 * 256)
    assert weight_bytes(online_cfg(), shape) == 28 * layer + 2 * unquantized == 1_142_926_720
    # 0.5 byte + 0.127 bit of scales per quantized weight.
    linears = 28 * shape.linear_params_per_layer
    assert (28 * layer) / linears == pytest.approx(0.5 + 0.127 / 8, rel=1e-3)
    no_dq = online_cfg(quantization={"double_quant": False})
    assert weight_bytes(no_dq, shape) - 2 * unquantized == pytest.approx(linears * (0.5 + 4 / 64), rel=1e-6)
    bf16 = online_cfg(quantization={"load_in_4bit": False})
    assert weight_bytes(bf16, shape) == 2 * shape.num_params


def test_tiny_weight_bytes_by_hand():
    shape = model_shape(str(SHAPES_DIR / "tiny-llama.json"))
    cfg = online_cfg(model_path=str(SHAPES_DIR / "tiny-llama.json"))
    # 64 x 64: 2048 packed + 64 absmax + 4; 64 x 192: 6144 + 192 + 4; unquantized 259 x 64 + 5 x 64
    # in bf16 (dtype auto on a GPU).
    assert weight_bytes(cfg, shape) == 2 * (4 * 2116 + 3 * 6340) + 2 * (259 * 64 + 5 * 64) == 88_760
    f32 = online_cfg(model_path=str(SHAPES_DIR / "tiny-llama.json"), dtype="float32")
    assert weight_bytes(f32, shape) == 88_760 + 2 * (259 * 64 + 5 * 64)


def test_kv_cache_lora_and_logits_by_hand():
    cfg = online_cfg(optim="adamw_torch")
    plan = estimate(cfg, model_shape(cfg.model_path))
    # k and v, 28 layers x 2 KV heads x 128 dims, bf16 (the residual stream keeps the model
    # dtype under QLoRA), for 8 sequences x 768 tokens.
    assert plan.kv_cache == 8 * 768 * 2 * 28 * 256 * 2 == 176_160_768
    # LoRA r=16 on all seven linears: 16 x (in + out) each.
    per_layer = 16 * ((1536 + 1536) * 2 + (1536 + 256) * 2 + (1536 + 8960) * 3)
    assert lora_param_count(cfg, model_shape(cfg.model_path)) == 28 * per_layer == 18_464_768
    assert plan.lora_params == plan.gradients == 4 * 28 * per_layer
    assert plan.optimizer_states == 8 * 28 * per_layer
    # Full logits for 8 x 512 completion tokens: fp32 logits, log_softmax and its gradient.
    assert plan.full_logits == 8 * 512 * 151_936 * 4 * 3
    # The fused kernel: the bf16 hidden state it reads and its gradient, plus 16 bytes per token.
    assert plan.logprob_step == 8 * 512 * (2 * 2 * 1536 + 16)
    assert plan.full_logits > 100 * plan.logprob_step


def test_eight_bit_optimizer_states():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    torch_states = estimate(online_cfg(optim="adamw_torch"), shape).optimizer_states
    bnb_states = estimate(online_cfg(optim="adamw_8bit"), shape).optimizer_states
    # Every LoRA tensor here has >= 4096 elements: 2 bytes + two fp32 absmax per 256 elements.
    assert bnb_states == pytest.approx(torch_states * (2 + 8 / 256) / 8, rel=1e-3)
    assert estimate(online_cfg(optim="paged_adamw_8bit"), shape).optimizer_states == bnb_states


def test_activation_formula_for_qwen_1_5b_by_hand():
    cfg = online_cfg()
    shape = model_shape(cfg.model_path)
    h, i, q, T = 1536, 8960, 1536, 768
    expected = (2 * 4 * h                           # two RMSNorm inputs in fp32
                + 4 * (3 * h + q + 2 * h + i)       # peft's fp32 copy of each adapted linear's bf16
                                                    # input: q/k/v, o, gate/up, down
                + 7 * 16 * 4                        # LoRA-A outputs
                + 2 * 4 * q + 4 * 12                # SDPA: q, repeated k and v, output (bf16);
                                                    # fp32 log-sum-exp
                + 3 * 2 * i                         # SiLU in/out, up
                + T * 2)                            # SDPA's bf16 padding mask
    assert layer_activation_bytes_per_token(cfg, shape, T) == expected == 153_072
    plan = estimate(cfg, shape)
    n = 8 * T
    assert plan.activations_full == 28 * expected * n + 4 * h * n
    assert plan.activations_checkpointed == 28 * n * 2 * h + expected * n + 4 * h * n
    assert plan.activations == plan.activations_checkpointed < plan.activations_full / 5
    # FlashAttention-2 saves q/k/v/out without repeating k/v and needs no mask.
    fa2 = dataclasses.replace(cfg, attn_implementation="flash_attention_2")
    assert (layer_activation_bytes_per_token(fa2, shape, T)
            == expected - 2 * 4 * q - T * 2 + 2 * (2 * q + 2 * 256))


def test_full_fine_tuning_counts_every_weight():
    cfg = online_cfg(quantization={"load_in_4bit": False}, lora={"enabled": False}, optim="adamw_torch",
                     online={"beta": 0.04})
    shape = model_shape(cfg.model_path)
    plan = estimate(cfg, shape)
    assert plan.weights == plan.gradients == 2 * shape.num_params
    assert plan.optimizer_states == 4 * shape.num_params
    assert plan.reference_weights == plan.weights  # beta > 0: a frozen copy
    assert plan.lora_params == 0 and plan.scoring > 0


# --------------------------------------------------------------------------------------------
# The formula against what autograd saves (CPU)
# --------------------------------------------------------------------------------------------


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = logprobs.token_logprobs(model, *batch, backend="chunked")
        total = sum(saved.values())
    del logps
    return total


def _small_model(tmp_path, layers: int, intermediate_size: int = 352) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo_fast.modeling import build_byte_tokenizer

    # Qwen2 block with GQA (4 heads, 2 KV heads) so SDPA's k/v repeat is exercised.
    config = AutoConfig.for_model("qwen2", vocab_size=259, hidden_size=128, intermediate_size=intermediate_size,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path / f"qwen2-{layers}-{intermediate_size}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quantization, dtype", [({"load_in_4bit": True}, "bfloat16"), ({}, "bfloat16")],
                         ids=["qlora-bf16", "lora-bf16"])
def test_layer_formula_matches_autograd_saved_tensors(tmp_path, quantization, dtype):
    """The per-layer term, measured as the difference between a 3-layer and a 1-layer model."""
    from grpo_fast.modeling import load_model_and_tokenizer

    S, T = 4, 48
    ids = torch.randint(0, 256, (S, T), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(S, T, dtype=torch.long)
    attention_mask[0, :7] = 0  # left padding: SDPA gets a mask, as in real GRPO batches
    completion_mask = torch.zeros(S, T)
    completion_mask[:, T // 2:] = 1
    measured, cfg = {}, None
    for layers in (1, 3):
        cfg = config_from_dict({"mode": "offline", "dataset_path": "unused", "dtype": dtype,
                                "model_path": _small_model(tmp_path, layers), "attn_implementation": "sdpa",
                                "quantization": quantization})
        model, _ = load_model_and_tokenizer(cfg, device=torch.device("cpu"))
        model.train()
        measured[layers] = _saved_bytes(model, (ids, attention_mask, completion_mask))
    per_layer = (measured[3] - measured[1]) / 2
    predicted = layer_activation_bytes_per_token(cfg, model_shape(cfg.model_path), T) * S * T
    # Only the RMSNorms' per-token rsqrt (8 bytes) is left out of the formula.
    assert per_layer == pytest.approx(predicted, rel=0.01)


def _profiled_peak(fn) -> int:
    """Peak bytes allocated on CPU while fn runs, above the level when it starts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("intermediate_size", [352, 704])
@pytest.mark.usefixtures("cpu_kind")
def test_generation_estimate_matches_the_cpu_profiler(tmp_path, intermediate_size):
    """KV cache + prefill working set of a real QLoRA generate, measured by the profiler.

    Two MLP widths, so that a term of the formula that does not follow the width shows. What the
    profiler cannot see: an op's own frees are placed at the op's start, so a transient inside
    one op (bitsandbytes' dequantized weight inside gemm_4bit) never shows; the plan counts that
    buffer as resident."""
    from grpo_fast.modeling import load_model_and_tokenizer

    S, P, C = 8, 48, 8
    cfg = config_from_dict({"mode": "online", "model_path": _small_model(tmp_path, 2, intermediate_size),
                            "dtype": "bfloat16",
                            "attn_implementation": "sdpa", "batch_size": 1, "quantization": {"load_in_4bit": True},
                            "online": {"dataset_name": "unused", "num_generations": S,
                                       "max_prompt_length": P, "max_completion_length": C}})
    model, _ = load_model_and_tokenizer(cfg, device=torch.device("cpu"))
    model.eval()
    ids = torch.randint(0, 256, (S, P), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(S, P, dtype=torch.long)
    mask[0, :5] = 0

    def generate():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=C,
                                 min_new_tokens=C, pad_token_id=0)
        assert out.shape == (S, P + C)

    plan = estimate(cfg, model_shape(cfg.model_path))
    assert _profiled_peak(generate) == pytest.approx(plan.generation, rel=0.03)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.usefixtures("cpu_kind")
def test_training_estimate_bounds_the_cpu_profiler(tmp_path, checkpointing):
    """Forward + backward of a QLoRA micro-batch: the plan is an upper bound, within 25%."""
    from grpo_fast.modeling import load_model_and_tokenizer

    S, P, C = 8, 32, 32
    cfg = config_from_dict({"mode": "online", "model_path": _small_model(tmp_path, 2), "dtype": "bfloat16",
                            "attn_implementation": "sdpa", "batch_size": 1, "quantization": {"load_in_4bit": True},
                            "gradient_checkpointing": checkpointing, "logprob_backend": "chunked",
                            "online": {"dataset_name": "unused", "num_generations": S,
                                       "max_prompt_length": P, "max_completion_length": C}})
    model, _ = load_model_and_tokenizer(cfg, device=torch.device("cpu"))
    model.train()
    ids = torch.randint(0, 256, (S, P + C), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(S, P + C, dtype=torch.long)
    attention_mask[0, :5] = 0
    completion_mask = torch.zeros(S, P + C)
    completion_mask[:, P:] = 1

    def step():
        logps, _ = logprobs.token_logprobs(model, ids, attention_mask, completion_mask, backend="chunked")
        (-logps.sum()).backward()

    measured = _profiled_peak(step)
    planned = estimate(cfg, model_shape(cfg.model_path)).training
    assert measured <= planned <= 1.25 * measured


# --------------------------------------------------------------------------------------------
# Totals and the fit search
# --------------------------------------------------------------------------------------------


def test_total_is_resident_plus_the_largest_phase():
    plan = estimate(online_cfg(), model_shape("Qwen/Qwen2.5-1.5B-Instruct"))
    assert plan.total == plan.resident + max(plan.generation, plan.scoring, plan.training)
    assert plan.allocated == plan.total - CUDA_OVERHEAD
    assert plan.scoring == 0  # beta = 0 and one iteration: no reference or old-policy pass
    assert plan.training > plan.generation > plan.kv_cache > 0


@pytest.mark.parametrize("key", ["online.num_generations", "online.max_completion_length", "batch_size"])
def test_total_grows_with_each_knob(key):
    shape = model_shape("Qwen/Qwen2.5-0.5B-Instruct")
    totals = []
    # num_generations starts at 2: one sample per prompt is refused (no group to be relative to).
    for value in (2, 4, 8, 64, 512) if key == "online.num_generations" else (1, 2, 4, 8, 64, 512):
        if key == "batch_size":
            cfg = online_cfg(model_path="Qwen/Qwen2.5-0.5B-Instruct", batch_size=value)
        else:
            cfg = online_cfg(model_path="Qwen/Qwen2.5-0.5B-Instruct", online={key.split(".")[1]: value})
        totals.append(estimate(cfg, shape).total)
    assert totals == sorted(totals) and totals[0] < totals[-1]


def test_fit_search_finds_the_boundary_and_is_monotone_in_the_card():
    cfg = online_cfg()
    shape = model_shape(cfg.model_path)
    previous = None
    for card in (4 * GiB, 8 * GiB, 12 * GiB, 24 * GiB):
        found = fit_search(cfg, shape, card)
        assert set(found) == {"online.num_generations", "online.max_completion_length", "batch_size"}
        for key, value in found.items():
            def total(v, key=key):
                if key == "batch_size":
                    changed = dataclasses.replace(cfg, batch_size=v)
                else:
                    changed = dataclasses.replace(cfg, online=dataclasses.replace(
                        cfg.online, **{key.split(".")[1]: v}))
                return estimate(changed, shape).total
            if value:
                assert total(value) <= card
            limit = 32768 - 256 if key == "online.max_completion_length" else FIT_SEARCH_MAX
            if value < limit:
                assert total(value + 1) > card
            if previous is not None:
                assert value >= previous[key]
        previous = found
    assert fit_search(cfg, shape, 1 * GiB) == {"online.num_generations": 0,
                                              "online.max_completion_length": 0, "batch_size": 0}


# --------------------------------------------------------------------------------------------
# The colocated vLLM engine (generation_backend: vllm)
# --------------------------------------------------------------------------------------------


def vllm_cfg(**online):
    return online_cfg(online={"generation_backend": "vllm", **online})


def test_vllm_engine_by_hand():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    plan = estimate(vllm_cfg(), shape, card=24 * GiB)
    engine = plan.engine
    # The 4-bit base reaches the engine dequantized, in bf16, with one bf16 LoRA slot of rank 16.
    assert engine.weights == 2 * shape.num_params == 3_087_428_608
    assert engine.lora_slot == 2 * lora_param_count(online_cfg(), shape)
    # k and v of 28 layers x 2 KV heads x 128 dims in bf16, for 8 sequences x 768 tokens.
    assert engine.kv_per_token == 2 * 28 * 2 * 128 * 2
    assert engine.kv_needed == 8 * 768 * engine.kv_per_token
    # vLLM's profile: 8192 tokens through an MLP (residual, hidden, gate/up, SiLU-and-mul, bf16)
    # vs a sampler step over max_num_seqs = 8 rows of the 151,936-token vocabulary.
    assert engine.workspace == max(8192 * 2 * (2 * 1536 + 3 * 8960), 8 * 151_936 * (2 + 32))
    assert engine.total == math.ceil(0.3 * 24 * GiB)
    assert engine.kv_cache == engine.total - engine.weights - engine.lora_slot - engine.workspace - ENGINE_FIXED
    assert engine.starts and engine.waves == 1
    # A card of 70 GiB or more profiles vLLM's larger default batch.
    assert estimate(vllm_cfg(), shape, card=80 * GiB).engine.batched_tokens == 16384


def test_vllm_backend_replaces_the_trainer_rollout_with_the_engine():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    hf, vllm = (estimate(cfg, shape, card=12 * GiB) for cfg in (online_cfg(), vllm_cfg()))
    assert hf.engine is None and hf.kv_cache > 0 and hf.generation_workspace > 0
    # The trainer no longer generates; everything else of it is unchanged.
    assert vllm.kv_cache == vllm.generation_workspace == vllm.generation == 0
    assert (vllm.resident, vllm.training, vllm.trainer) == (hf.resident, hf.training, hf.trainer)
    assert vllm.total == vllm.trainer + vllm.engine.total > hf.total
    # TRL's spelling plans the same.
    assert estimate(online_cfg(online={"use_vllm": True}), shape, card=12 * GiB) == vllm
    # An offline config never has an engine.
    offline = config_from_dict({"mode": "offline", "dataset_path": "unused", "model_path": "Qwen/Qwen2.5-1.5B-Instruct"})
    assert estimate(offline, shape, group_size=4).engine is None


def test_vllm_utilization_sets_the_engine_total():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    low, high = (estimate(vllm_cfg(vllm_gpu_memory_utilization=u), shape, card=24 * GiB) for u in (0.3, 0.5))
    assert high.engine.total - low.engine.total == math.ceil(0.5 * 24 * GiB) - math.ceil(0.3 * 24 * GiB)
    assert high.total - low.total == high.engine.total - low.engine.total
    assert high.engine.kv_cache - low.engine.kv_cache == high.engine.total - low.engine.total


def test_vllm_sleep_mode_lowers_the_peak_to_the_larger_phase():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    awake, asleep = (estimate(online_cfg(batch_size=5, online={"generation_backend": "vllm",
                                                               "vllm_enable_sleep_mode": s}),
                              shape, card=12 * GiB) for s in (False, True))
    assert awake.total == awake.trainer + awake.engine.total
    assert asleep.total == max(asleep.trainer + ENGINE_FIXED, asleep.resident + asleep.engine.total) < awake.total
    # 40 sequences: training sets the peak. One prompt's 8: the rollout does.
    assert asleep.total == asleep.trainer + ENGINE_FIXED
    small = estimate(vllm_cfg(vllm_enable_sleep_mode=True), shape, card=12 * GiB)
    assert small.total == small.resident + small.engine.total
    # LoRA runs offload the weights to CPU RAM (level 1); full fine-tuning drops them (level 2).
    assert asleep.engine.offloaded == asleep.engine.weights + asleep.engine.lora_slot
    full = online_cfg(quantization={"load_in_4bit": False}, lora={"enabled": False},
                      online={"generation_backend": "vllm", "vllm_enable_sleep_mode": True})
    engine = estimate(full, shape, card=12 * GiB).engine
    assert engine.lora_slot == engine.offloaded == 0 and engine.weights == 2 * shape.num_params


def test_vllm_tensor_parallel_divides_the_engine_weights():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    one, two = (estimate(vllm_cfg(vllm_tensor_parallel_size=tp), shape, card=12 * GiB).engine for tp in (1, 2))
    assert two.weights == one.weights // 2 and two.lora_slot == one.lora_slot // 2
    # Each GPU holds one of the 2 KV heads; with more GPUs than KV heads vLLM replicates them.
    assert two.kv_per_token == one.kv_per_token // 2
    four = estimate(vllm_cfg(vllm_tensor_parallel_size=4), shape, card=12 * GiB).engine
    assert four.kv_per_token == two.kv_per_token and four.weights == one.weights // 4


def test_vllm_max_model_length_decides_whether_vllm_starts():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    default = estimate(vllm_cfg(vllm_gpu_memory_utilization=0.35), shape, card=12 * GiB)
    assert default.engine.max_model_len == 768 and default.fits(12 * GiB)
    # vLLM refuses to start unless its KV cache holds one max_model_len sequence: 32768 tokens
    # need 0.88 GiB, more than the 0.35 x 12 GiB engine leaves after its weights and workspace.
    long = estimate(vllm_cfg(vllm_gpu_memory_utilization=0.35, vllm_max_model_length=32768), shape, card=12 * GiB)
    assert long.engine.start_total > long.engine.total >= default.engine.start_total
    assert not long.engine.starts and long.engine.waves == 0
    assert long.total == default.total and not long.fits(12 * GiB)
    assert "less than one 32768-token sequence" in long.engine.problem()
    # The fit search holds completions to the engine's length.
    roomy = vllm_cfg(vllm_max_model_length=1024, vllm_gpu_memory_utilization=0.4)
    assert fit_search(roomy, shape, 40 * GiB)["online.max_completion_length"] == 1024 - 256


def test_vllm_waves_when_the_kv_cache_holds_part_of_a_micro_batch():
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    engine = estimate(vllm_cfg(num_generations=64, vllm_gpu_memory_utilization=0.35), shape, card=12 * GiB).engine
    # 64 sequences x 768 tokens need 1.31 GiB of KV cache; 0.35 x 12 GiB leaves less.
    assert engine.starts and engine.kv_cache < engine.kv_needed
    at_once = engine.kv_cache // (768 * engine.kv_per_token)
    assert engine.at_once == at_once < 64 and engine.waves == math.ceil(64 / at_once) > 1
    assert engine.utilization_for(engine.one_wave_total) > 0.35


def test_vllm_without_a_card_has_no_total():
    plan = estimate(vllm_cfg(), model_shape("Qwen/Qwen2.5-1.5B-Instruct"))
    assert plan.engine.total is None and plan.engine.kv_cache is None and not plan.engine.starts
    with pytest.raises(ConfigError, match="--gpu-memory"):
        plan.total
    assert plan.trainer > 0 and plan.engine.start_total < plan.engine.one_wave_total


def test_vllm_report_without_a_card_names_the_engine_share(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no local card to fall back on
    text = plan_command(vllm_cfg(), None)
    assert "trainer = resident + training" in text
    assert "peak = trainer + 0.3 x card: pass --gpu-memory for the total" in text
    assert re.search(r"the engine needs [\d.]+ GiB to start, [\d.]+ GiB to decode a micro-batch at once", text)
    asleep = plan_command(vllm_cfg(vllm_enable_sleep_mode=True), None)
    assert "peak = the larger of trainer + 0.25 and resident + 0.3 x card" in asleep


def test_vllm_fit_search_is_monotone_and_finds_the_utilization():
    cfg = vllm_cfg(vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.4)
    shape = model_shape(cfg.model_path)
    previous = None
    for card in (8 * GiB, 12 * GiB, 24 * GiB):
        found = fit_search(cfg, shape, card)
        assert set(found) == {"online.num_generations", "online.max_completion_length", "batch_size",
                              "online.vllm_gpu_memory_utilization"}
        for key, value in found.items():
            def plan(v, key=key):
                changed = (dataclasses.replace(cfg, batch_size=v) if key == "batch_size" else
                           dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, **{key.split(".")[1]: v})))
                return estimate(changed, shape, card=card)
            step = 0.01 if key == "online.vllm_gpu_memory_utilization" else 1
            if value:
                assert plan(value).fits(card)
            if key != "online.vllm_gpu_memory_utilization" or value < 1:
                assert not plan(round(value + step, 2)).fits(card)
            if previous is not None:
                assert value >= previous[key]
        previous = found
    # Without sleep mode the engine's share comes on top of training: less fits.
    awake = fit_search(vllm_cfg(vllm_gpu_memory_utilization=0.4), shape, 24 * GiB)
    assert awake["batch_size"] < previous["batch_size"]
    # An engine that cannot start fits nothing, whatever the batch.
    assert fit_search(vllm_cfg(vllm_gpu_memory_utilization=0.1), shape, 12 * GiB)["batch_size"] == 0


def test_vllm_report_shows_the_engine():
    text = plan_command(vllm_cfg(vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.4), "12GiB")
    for expected in ("engine (vLLM, colocated; sleep mode on)", "weights (bf16, the dequantized 4-bit base)",
                     "LoRA slot (r=16, bf16)", "profiled workspace (8192 tokens, 8 rows)", "KV cache: the rest",
                     "all 8 sequences at once", "total = 0.4 x card", "peak = resident + engine (rollout)",
                     "offloads its", "online.vllm_gpu_memory_utilization", "fits"):
        assert expected in text, expected
    assert "rollout (generate, no grad)" not in text
    table = text.split("  training = activations")[0]
    values = [line for line in table.splitlines() if re.search(r"\d\.\d\d$", line)]
    assert len(values) >= 14 and len({len(line) for line in values}) == 1
    assert "sleep mode off" in plan_command(vllm_cfg(), "24GiB")
    # Too small a share: one line says so, and nothing fits.
    text = plan_command(vllm_cfg(vllm_gpu_memory_utilization=0.2), "12GiB")
    problem = [line for line in text.splitlines() if line.startswith("  vLLM cannot start")]
    assert len(problem) == 1 and "no room even for the engine's 2.91 GiB of weights; raise it to at least" in problem[0]
    assert "does NOT fit: vLLM cannot start" in text and "batch_size                          none" in text


# --------------------------------------------------------------------------------------------
# --gpu-memory, the report and the CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("12GiB", 12 * 2**30), ("24GB", 24 * 10**9), ("8 GiB", 8 * 2**30),
                                            ("11.5gib", int(11.5 * 2**30)), ("16000MiB", 16000 * 2**20),
                                            (" 80 GB ", 80 * 10**9)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["12", "twelve GiB", "12 parsecs", "0GiB", "-4GiB", "GiB", ""])
def test_parse_memory_errors_name_the_flag(text):
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory(text)


def test_plan_command_report():
    text = plan_command(online_cfg(), "12GiB")
    for expected in ("1.54B params", "configs/models/qwen2.5-1.5b.json", "nf4 + double quant",
                     "KV cache, 8 x 768 tokens", "activations, checkpointed", "without checkpointing",
                     "full logits would need", "peak = resident + training", "card 12GiB (12.00 GiB): fits",
                     "online.num_generations", "online.max_completion_length", "batch_size"):
        assert expected in text
    # The table's values are aligned in one column.
    values = [line for line in text.splitlines() if re.search(r"\d\.\d\d$", line)]
    assert len(values) >= 10 and len({len(line) for line in values}) == 1
    assert "does NOT fit" in plan_command(online_cfg(batch_size=8), "8GiB")


def test_cli_plan_prints_a_table(capsys):
    assert main(["plan", "--config", str(REPO / "configs/qwen2.5-1.5b-gsm8k-qlora.yaml"),
                 "--gpu-memory", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "VRAM plan for Qwen/Qwen2.5-1.5B-Instruct" in out and "GiB" in out and "fits" in out


def test_cli_plan_errors_exit_2(capsys, tmp_path):
    preset = str(REPO / "configs/qwen2.5-1.5b-gsm8k-qlora.yaml")
    assert main(["plan", "--config", preset, "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "--config", preset, "--set", "model_path=acme/unknown-13b"]) == 2
    assert "no shape for 'acme/unknown-13b'" in capsys.readouterr().err


def test_cli_plan_offline_reads_the_group_size(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["plan", "--config", "configs/tiny-offline.yaml", "--gpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "16 groups x" in out and "KV cache" not in out and "batch_size" in out


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_fit_their_card_and_quote_the_planner(name):
    path = REPO / "configs" / name
    cfg = load_config(path)
    assert cfg.mode == "online" and cfg.online.dataset_name == "openai/gsm8k"
    assert cfg.online.dataset_config == "main" and cfg.online.prompt_column == "question"
    assert [r.name for r in cfg.online.rewards] == ["math_answer", "format"]
    q = cfg.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert cfg.lora.target_modules == "all-linear" and cfg.gradient_checkpointing
    header = path.read_text().split("\nmode:")[0]
    assert f"grpo-fast plan  --config configs/{name}" in header
    quoted = float(re.search(r"Planner estimate: ([\d.]+) GiB peak with SDPA", header).group(1))
    card = PRESETS[name]
    plan = estimate(dataclasses.replace(cfg, attn_implementation="sdpa"), model_shape(cfg.model_path), card=card)
    assert quoted == round(plan.total / GiB, 2)
    assert plan.fits(card) and plan.total <= 0.85 * card
    if plan.engine is not None:
        # The engine decodes a whole micro-batch at once.
        assert plan.engine.waves == 1
