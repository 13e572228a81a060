"""Model shapes (config.json fields) for the planner and the tiny random-weight presets.

Shipped in the wheel as the package data of `grpo_fast.model_configs` (pyproject.toml maps this
directory there), so `grpo_fast.plan.shapes` finds them with importlib.resources from any
directory. Configs may still name a file here by path (`configs/models/tiny-llama.json`) from a
source checkout.
"""
