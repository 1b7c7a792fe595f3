"""fitgpt.planner."""
