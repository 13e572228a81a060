"""TRL's names: every field of TRL 1.16's `GRPOConfig` (its own and the `TrainingArguments` it
inherits) mapped to the grpo-fast key, or to the reason there is none.

    TRL_FIELDS["per_device_train_batch_size"]   # ("batch_size", "it counts prompts, ...")
    TRL_FIELDS["vllm_group_port"]               # (None, "not used: ...")

The config reads it for its unknown-key errors (a TRL name gets the grpo-fast key instead of the
list of allowed keys); README "Coming from TRL" is rendered from it; tests/test_config_trl.py
checks that it covers every GRPOConfig field and that every key it names exists. Pure data, so
that importing the config never imports TRL.
"""

from __future__ import annotations

from typing import Optional


def _none(reason: str, names: str) -> dict[str, tuple[None, str]]:
    """The fields (space-separated) that share one reason for having no grpo-fast key."""
    return dict.fromkeys(names.split(), (None, reason))


# field -> (grpo-fast dotted key, how it differs) or (None, "not used: ..." / "not supported
# [yet]: ..."). The key of an online option is under `online.` even where the name is TRL's.
TRL_FIELDS: dict[str, tuple[Optional[str], str]] = {
    "output_dir": ("output_dir", "TRL's null means trainer_output"),
    "per_device_train_batch_size": ("batch_size", "it counts prompts, each sampled online.num_generations times: "
                                    "per_device_train_batch_size / num_generations; default 8 prompts "
                                    "(TRL: 8 completions)"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "a step samples batch_size x "
                                    "gradient_accumulation_steps prompts, as TRL's default"),
    "num_train_epochs": ("num_epochs", "default 1 (TRL: 3)"),
    "max_steps": ("max_steps", "a step is one rollout batch and its online.num_iterations updates (TRL counts "
                  "updates)"),
    "learning_rate": ("learning_rate", ""),
    "lr_scheduler_type": ("lr_scheduler_type", "constant, linear, cosine or constant_with_warmup"),
    "warmup_steps": ("warmup_ratio", "a fraction of the steps, as TRL reads warmup_steps < 1; "
                     "n steps are n / max_steps"),
    "optim": ("optim", "adamw_torch (fused where it can be), adamw_8bit or paged_adamw_8bit"),
    "weight_decay": ("weight_decay", ""),
    "max_grad_norm": ("max_grad_norm", ""),
    "seed": ("seed", "also orders the prompts"),
    "bf16": ("mixed_precision", "TRL's default bf16 autocast over fp32 weights is `mixed_precision: bf16` with "
             "`dtype: float32`; `dtype: bfloat16` trains bf16 weights"),
    "fp16": ("mixed_precision", "`fp16: true` is `mixed_precision: fp16` with `dtype: float32`"),
    "gradient_checkpointing": ("gradient_checkpointing", "always non-reentrant"),
    "activation_checkpointing": ("gradient_checkpointing", "transformers 5's new name for it"),
    "logging_steps": ("logging_steps", "a number of steps (TRL also takes a fraction < 1 of the run)"),
    "logging_strategy": ("logging_steps", "always by steps"),
    "save_steps": ("save_steps", "a number of steps (TRL also takes a fraction < 1 of the run)"),
    "save_strategy": ("save_steps", "always by steps"),
    "save_total_limit": ("save_total_limit", ""),
    "report_to": ("report_to", "none, tensorboard, wandb or trackio: one tracker, not a list or all"),
    "eval_steps": ("online.eval_steps", "a number of steps; 0 = never"),
    "eval_strategy": ("online.eval_steps", "every online.eval_steps steps; 0 = never (TRL's no)"),
    "num_generations_eval": ("online.num_generations_eval", "null = one greedy completion (TRL: num_generations)"),
    "max_completion_length": ("online.max_completion_length",
                              "online.max_prompt_length also cuts prompts from the left"),
    "beta": ("online.beta", "0 skips the reference pass"),
    "epsilon": ("online.epsilon_low", "TRL's epsilon_high defaults to epsilon, grpo-fast's to 0.2: set both"),
    "epsilon_high": ("online.epsilon_high", "defaults to 0.2, not to epsilon"),
    "loss_type": ("online.loss_type", "a name in grpo_fast.losses' registry"),
    "scale_rewards": ("online.scale_rewards", "TRL's true / false load as group / none"),
    "reward_weights": ("online.rewards", "the weight of each entry"),
    "log_completions": ("online.log_completions_steps", "every N steps (0 = never), all of that step's "
                        "completions to completions.jsonl and a few to the log; default 50 (TRL: off)"),
    **{name: (f"online.{name}", "") for name in (
        "num_generations temperature top_p top_k min_p repetition_penalty generation_kwargs chat_template_kwargs "
        "num_iterations delta importance_sampling_level sapo_temperature_pos sapo_temperature_neg vespo_k_pos "
        "vespo_lambda_pos vespo_k_neg vespo_lambda_neg mask_truncated_completions top_entropy_quantile "
        "use_bias_correction_kl").split()},
    "resume_from_checkpoint": (None, "not a config key: `grpo-fast train --resume` resumes from output_dir"),
    "save_only_model": (None, "not used: checkpoints always hold what an exact --resume needs"),
    "ignore_data_skip": (None, "not used: --resume restores the position in the seeded prompt stream"),
    "shuffle_dataset": (None, "not used: prompts are always drawn in a seeded shuffle, a new one each epoch"),
    "data_seed": (None, "not used: seed orders the prompts"),
    "use_cpu": (None, "not used: training runs on CUDA when available, else on the CPU"),
    "remove_unused_columns": (None, "not used: every dataset column reaches the reward functions (TRL's default)"),
    "logging_nan_inf_filter": (None, "not used: a non-finite loss stops training with an error"),
    "use_cache": (None, "not used: the rollout always decodes with the KV cache"),
    "cache_implementation": (None, "not used: the hf backend decodes with its own KV cache"),
    "cast_lm_head_to_fp32": (None, "not used: the log-prob kernel computes the log-softmax in fp32 (the head's "
                             "matmul runs in the weights' dtype)"),
    "per_device_eval_batch_size": (None, "not used: eval decodes its prompts (online.eval_max_samples at most) "
                                   "in one batch"),
    "num_completions_to_print": (None, "not used: a few completions go to the log, all to completions.jsonl"),
    "log_multimodal": (None, "not used: prompts are text"),
    "auto_find_batch_size": (None, "not supported: groups must stay whole (TRL's GRPO rejects it too); "
                             "`grpo-fast plan` sizes the batch"),
    "neftune_noise_alpha": (None, "not supported: NEFTune is for supervised fine-tuning"),
    "model_init_kwargs": (None, "not supported: model_path, dtype, attn_implementation and quantization load it"),
    "trust_remote_code": (None, "not supported yet: models load without remote code"),
    "router_aux_loss_coef": (None, "not supported yet: no MoE load-balancing loss"),
    "disable_dropout": (None, "not supported yet: lora.dropout defaults to 0; a full model keeps its dropout"),
    "tf32": (None, "not supported yet: torch's default matmul precision"),
    "pad_to_multiple_of": (None, "not supported yet: batches are padded to their longest row"),
    "generation_batch_size": (None, "not supported yet: a step's rollout batch is batch_size x "
                              "gradient_accumulation_steps prompts (TRL's default)"),
    "steps_per_generation": (None, "not supported yet: one rollout batch per step (TRL's default, "
                             "gradient_accumulation_steps); online.num_iterations reuses it"),
    "multi_objective_aggregation": (None, "not supported yet: weighted rewards are summed, then normalized "
                                    "(TRL's default sum_then_normalize)"),
    "max_tool_calling_iterations": (None, "not supported yet: no tool calling"),
    "off_policy_mask_threshold": (None, "not supported yet: no off-policy sequence masking"),
    "log_unique_prompts": (None, "not supported yet: completions.jsonl lists every completion with its prompt"),
    "full_determinism": (None, "not supported yet: no deterministic-algorithms switch (seed seeds every RNG)"),
    **_none("not supported yet: the optimizer and scheduler read optim, learning_rate, weight_decay, "
            "lr_scheduler_type and warmup_ratio",
            "lr_scheduler_kwargs optim_args optim_target_modules"),
    **_none("not supported yet: AdamW's defaults (0.9, 0.999, 1e-8), which are TRL's",
            "adam_beta1 adam_beta2 adam_epsilon"),
    **_none("not used: eval runs in the training dtype", "bf16_full_eval fp16_full_eval"),
    **_none("not used: checkpointing is always non-reentrant",
            "gradient_checkpointing_kwargs activation_checkpointing_kwargs"),
    **_none("not supported yet: no torch.compile", "torch_compile torch_compile_backend torch_compile_mode"),
    **_none("not used: grpo-fast has its own fused log-prob kernel (logprob_backend)",
            "use_liger_kernel liger_kernel_config"),
    **_none("not supported yet: a tracker names the run after output_dir, in project grpo-fast",
            "run_name project trackio_space_id trackio_bucket_id trackio_static_space_id"),
    **_none("not supported yet: the first eval is at step online.eval_steps", "eval_delay eval_on_start"),
    **_none("not supported yet: the final model is the last step's",
            "load_best_model_at_end metric_for_best_model greater_is_better"),
    **_none("not supported yet: no Hub upload (output_dir holds the checkpoints and the final model)",
            "push_to_hub hub_token hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision "
            "log_completions_hub_repo"),
    **_none("not supported yet: the reference stays the starting model",
            "sync_ref_model ref_model_mixup_alpha ref_model_sync_steps"),
    **_none("not supported yet: no entropy bonus (entropy is logged)", "entropy_coef use_adaptive_entropy "
            "entropy_coef_min entropy_coef_max entropy_coef_delta entropy_target"),
    **_none("not used: the hf backend drops finished rows from its decoding batch itself",
            "use_transformers_continuous_batching transformers_continuous_batching_config use_transformers_paged"),
    "use_vllm": ("online.use_vllm", "or online.generation_backend: vllm"),
    "vllm_gpu_memory_utilization": ("online.vllm_gpu_memory_utilization", "on CPU the KV cache is sized to the "
                                    "rollouts instead"),
    "vllm_max_model_length": ("online.vllm_max_model_length", "default max_prompt_length + max_completion_length"),
    "vllm_enable_sleep_mode": ("online.vllm_enable_sleep_mode", "GPU only"),
    "vllm_tensor_parallel_size": ("online.vllm_tensor_parallel_size", ""),
    "vllm_importance_sampling_correction": ("online.vllm_importance_sampling_correction", ""),
    "vllm_importance_sampling_mode": ("online.vllm_importance_sampling_mode", ""),
    "vllm_importance_sampling_clip_max": ("online.vllm_importance_sampling_clip_max", ""),
    "vllm_importance_sampling_clip_min": ("online.vllm_importance_sampling_clip_min", ""),
    "ds3_gather_for_generation": ("online.ds3_gather_for_generation", "ZeRO-3 and FSDP2"),
    "vllm_importance_sampling_cap": ("online.vllm_importance_sampling_clip_max", "TRL's deprecated name"),
    "vllm_mode": ("online.vllm_mode", "server means `grpo-fast vllm-serve` (not `trl vllm-serve`); it also runs "
                  "under several trainer processes"),
    "vllm_server_base_url": ("online.vllm_server_base_url", ""),
    "vllm_server_host": ("online.vllm_server_host", "also where `grpo-fast vllm-serve` listens"),
    "vllm_server_port": ("online.vllm_server_port", "also where `grpo-fast vllm-serve` listens"),
    "vllm_server_timeout": ("online.vllm_server_timeout", ""),
    "vllm_group_port": (None, "not used: the policy reaches the server over its HTTP port (no NCCL group)"),
    **_none("not supported yet: vLLM runs its own model implementation", "vllm_model_impl"),
    **_none("not supported yet: no constrained decoding", "vllm_structured_outputs_regex"),
    **_none("not used: torchrun or accelerate launch sets up the processes; online mode wraps the model in "
            "plain DDP", "ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph "
            "ddp_backend ddp_timeout accelerator_config local_rank"),
    **_none("not used: the token count of a global normalizer is always summed over ranks",
            "average_tokens_across_devices"),
    **_none("not used: the main process logs and saves, once", "log_on_each_node save_on_each_node"),
    **_none("not used: the accelerate config file chooses DDP, FSDP2 or DeepSpeed (configs/accelerate/; "
            "README Multi-GPU and multi-node)", "fsdp fsdp_config deepspeed parallelism_config"),

    **_none("not used: HF Trainer plumbing, which grpo-fast's own loop has no counterpart for",
            "logging_first_step include_num_input_tokens_seen log_level log_level_replica disable_tqdm "
            "prediction_loss_only eval_do_concat_batches eval_use_gather_object eval_accumulation_steps "
            "include_for_metrics batch_eval_metrics enable_jit_checkpoint label_smoothing_factor "
            "restore_callback_states_from_checkpoint torch_empty_cache_steps dataloader_drop_last "
            "dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers "
            "dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order label_names "
            "train_sampling_strategy length_column_name debug skip_memory_metrics do_train do_eval do_predict"),
}
