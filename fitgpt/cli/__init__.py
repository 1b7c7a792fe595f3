"""fitgpt.cli."""
