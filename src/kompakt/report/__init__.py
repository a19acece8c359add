"""Reports of compress runs: the measured original-vs-result comparison, HTML / Markdown / JSON, the model card."""
