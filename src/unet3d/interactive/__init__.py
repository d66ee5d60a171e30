"""The interactive loop (paint, train, preview, correct), free of any GUI toolkit."""
