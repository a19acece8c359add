"""Everything that knows transformers loading and model architectures."""
