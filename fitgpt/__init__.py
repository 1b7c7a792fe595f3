"""fitgpt: GPT-2-style pretraining that knows its memory."""

__version__ = "0.1.0"
