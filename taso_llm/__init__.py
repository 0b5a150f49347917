"""taso-llm: task-aligned sparse fine-tuning recipes for LLaMA-class models."""

__version__ = "0.1.0"
