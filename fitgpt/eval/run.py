"""`fitgpt eval`: a saved model's loss (and bits per byte) on validation windows, with its peak
memory. The windows are the run's own (`eval.*` and `data.dir` from the checkpoint's config)
unless overridden on the command line; HellaSwag is fitgpt.eval.hellaswag."""

from __future__ import annotations


def eval_checkpoint(where: str, overrides: list[str]) -> dict:
    """`fitgpt eval`: the checkpoint's model on its (or the overridden) validation windows."""
    import torch

    from fitgpt.console import fmt_bytes, say
    from fitgpt.data.shards import ValWindows, find_splits
    from fitgpt.data.tokenizer import find_meta
    from fitgpt.eval.evaluate import evaluate
    from fitgpt.model.runtime import resolve_data_dir
    from fitgpt.planner.tracker import StorageTracker
    from fitgpt.store.load import load_model

    notes: list[str] = []
    cfg, model, rt = load_model(where, overrides, notes)
    for note in notes:
        say(f"note: {note}")
    _, val_files = find_splits(resolve_data_dir(cfg.data.dir))
    val = ValWindows(val_files, cfg.eval_block_size, cfg.eval_windows)
    vocab = cfg.model.vocab_size
    meta = find_meta(cfg.data.dir)  # a character-level nanoGPT dataset: bytes per id for bpb
    table = meta.byte_table(2**16) if meta is not None else None
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        res = evaluate(model, val, cfg.eval_batch_size, rt, vocab=vocab, byte_table=table)
        peak = torch.cuda.max_memory_allocated(rt.device)
    else:
        tracker = StorageTracker(rt.device_type)
        tracker.add(model)
        with tracker:
            res = evaluate(model, val, cfg.eval_batch_size, rt, vocab=vocab, byte_table=table)
        peak = tracker.peak
    bpb = f" | {res.bpb:.4f} bits per byte" if res.bpb is not None else ""
    say(f"val loss {res.loss:.4f}{bpb} | {res.tokens:,} tokens ({val.n_windows} windows of "
        f"{cfg.eval_block_size}, batch {cfg.eval_batch_size}) | {res.seconds:.1f}s | "
        f"peak {fmt_bytes(peak)}")
    return {"val_loss": res.loss, "val_bpb": res.bpb, "tokens": res.tokens, "peak_bytes": peak}
