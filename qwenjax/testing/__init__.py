"""Test doubles shipped with the package: tiny checkpoints, tokenizer and demo data."""
