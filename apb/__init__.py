"""apb: distributed long-context prefill (APB, Spava, Star, ring, Ulysses) over Hugging Face models."""

__version__ = "0.1.0"
