"""Training recipes (YAML package data) of the built-in tokenizers."""
