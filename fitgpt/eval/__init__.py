"""fitgpt.eval."""
