"""Text sources (hub datasets, local files), tokenization and packing, the offline demo corpus."""
