"""Memory, predicted: the peak of a training step and of an evaluation, before allocating.

Owns: the replayed allocation timeline (timeline, blocks, stack, estimate), what the activation
levers cost in time (activations), what to change so that a run fits (fit: proposals,
memory.fit=auto; levers: the memory levers it adds and why; speed: the predicted throughput
that ranks them), the card table, its PCIe links and nvidia-smi (gpus), `fitgpt plan` and
`prepare_training`, the pre-flight of `fitgpt train` (plan), the byte counter that measures on
any device (tracker), and `fitgpt plan --verify` (verify).

May import: model, data, config and the base modules. No torch at module level except tracker
and verify, so that `fitgpt plan` runs on a machine without torch. One upward edge: verify
imports train, because it measures the very step that trains (train's `build_training`), not a
copy of it.

Entry points: `plan.make_plan`, `plan.prepare_training`, `estimate.estimate`, `fit.auto_fit`,
`verify.verify`.
"""
