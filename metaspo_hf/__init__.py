"""metaspo-hf: meta-learned system prompt optimization (MetaSPO) with in-process Hugging Face models."""

__version__ = "0.1.0"
