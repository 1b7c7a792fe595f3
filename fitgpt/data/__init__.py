"""Tokens on disk: shard formats, batches, manifests, the tokenizer, and preparing them.

Owns: llm.c shard files, the training batches and the fixed validation windows (shards), a data
folder's manifest.json and largest token ids (manifest), GPT-2's BPE offline and nanoGPT's
character vocabulary (tokenizer), `fitgpt data inspect` (inspect), and `fitgpt prepare`
(prepare/).

May import: config and the base modules. torch only inside the functions that make batches
(shards), so that reading or writing shards stays light.

Entry points: `shards.TrainBatches`, `shards.ValWindows`, `manifest.read_manifest`,
`tokenizer.gpt2_encoding`, `inspect.inspect_dir`, `prepare.job.run_job`.
"""
