"""What a run tells: its log and metrics, the summary, pictures, and runs after the fact.

Owns: train.log, metrics.jsonl and the progress bar (log: `RunLog`, rank 0 only), metrics
records, MFU, the summary and the W&B / TensorBoard trackers (metrics), plots.png, `fitgpt plot`
and `fitgpt plan --png` (plots: matplotlib imported only to draw), the runs under a folder
(runs: `fitgpt runs`, `fitgpt plot`), and a Hugging Face GPT-2 folder (export: `fitgpt export`).

May import: eval, store, planner, model, data, config and the base modules. torch only inside
the functions that need it (a card's peak FLOP/s, export).

Entry points: `log.RunLog`, `metrics.record_train`, `metrics.summary`, `runs.list_runs`,
`runs.plot_runs`, `plots.plan_png`, `export.export_checkpoint`.
"""
