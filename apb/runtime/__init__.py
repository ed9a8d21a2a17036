"""What runs on each host: the worker (one per rank, any launcher), the prefill through the
unmodified model, the KV cache and its gather, and decoding (gathered or distributed)."""
