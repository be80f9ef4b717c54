"""One module per engine: how to read its batches, and where to put the step span."""
