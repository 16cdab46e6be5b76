"""Domain data: sources, splits, formats, presets, generators, tokenization and batches."""
