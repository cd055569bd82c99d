"""alchemist-sgl: an online continual-learning LLM server built on SGLang."""

__version__ = "0.1.0"
