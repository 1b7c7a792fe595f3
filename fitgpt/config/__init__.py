"""fitgpt.config."""
