"""The model side: finding a checkpoint (presets, packaged, local, GGUF, named real models), its
tokenizer and prompt format, and the bridge that routes every attention layer to a method."""
