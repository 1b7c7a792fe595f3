"""fitgpt.model."""
