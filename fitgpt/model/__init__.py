"""The GPT-2 model, and the facts about its shape that everyone else computes from.

Owns: the model read top to bottom (gpt), cross-entropy without the full logits (loss),
sampling with a KV cache (generate), activation checkpointing and offloading applied from
outside the model's code (checkpointing, offload), device, dtype, autocast and `build_model` (runtime), and `ModelShape`
(shape: padded vocabulary, parameter counts, FLOPs per token, per-layer sizes; the one formula
the planner, the bench, the metrics and `fitgpt runs` share).

May import: data, config and the base modules. All but shape import torch; shape is pure
Python, so the planner uses it without torch.

Entry points: `gpt.GPT`, `runtime.build_model`, `runtime.resolve_runtime`, `shape.ModelShape`.
"""
