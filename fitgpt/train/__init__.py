"""fitgpt.train."""
