"""Adapters between qpeft and other libraries (transformers, PEFT); each file imports its library lazily."""
