"""The network's inputs and targets: label encoding, intensity normalization, ilastik's filter bank
(extra input channels, and the forest's features), patch sampling."""
