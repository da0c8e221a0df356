"""Data: prompt rendering and filtering, datasets, and a tiny offline tokenizer for tests/demos."""
