"""clbench: continual fine-tuning of LLMs, with strategies compared head to head."""

__version__ = "0.1.0"
