"""`fitgpt prepare`: documents into llm.c token shards, in parallel and resumable.

Owns: one preparation's input, sizes and progress (job), where documents come from: text, JSON
lines and parquet files, FineWeb from the hub (sources), chunks, the worker pool, the shard
writer and the manifest (pipeline), the tokenizing that each worker process runs (encode), and
the built-in King James demo corpus (demo).

May import: the rest of data (shards, manifest, tokenizer), config and the base modules. Never
torch at import: every worker process imports encode and must start in a fraction of a second
(import-linter's contracts and tests/test_layers.py check it).

Entry points: `job.run_job`, `pipeline.prepare_shards`, `demo.demo_data_dir`.
"""
