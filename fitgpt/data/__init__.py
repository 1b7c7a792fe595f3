"""fitgpt.data."""
