"""fitgpt.data.prepare."""
