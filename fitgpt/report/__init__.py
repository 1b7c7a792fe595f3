"""fitgpt.report."""
