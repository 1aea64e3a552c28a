"""Checkpoint readers, one declarative spec per architecture family, and the GGUF writer."""
