"""Command-line interface: one module per command; each parses, calls the API and prints."""
