"""Training data: label encoding, intensity normalization, patch sampling."""
