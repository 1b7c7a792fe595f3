"""fitgpt.store."""
