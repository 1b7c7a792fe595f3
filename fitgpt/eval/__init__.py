"""Evaluating a model: loss on fixed validation windows, HellaSwag, and sampling text.

Owns: the validation pass that training runs at every eval.interval (evaluate: summed token
losses, bits per byte), `fitgpt eval` on a saved model (run), HellaSwag scored completion style
(hellaswag), and `fitgpt sample` (sample; the KV cache is the model's).

May import: store (to open saved models), planner, model, data, config and the base modules.
Imports torch (run and sample only inside their functions).

Entry points: `evaluate.evaluate`, `run.eval_checkpoint`, `hellaswag.eval_hellaswag`,
`sample.sample_checkpoint`.
"""
