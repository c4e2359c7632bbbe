"""llamapool: a supervised pool of llama.cpp worker processes behind an OpenAI-compatible API."""

__version__ = "0.1.0"
