"""Adapters that plug qpeft into other libraries (transformers, PEFT); each file imports its library itself."""
