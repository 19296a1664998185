"""Pure tensor functions: no Lightning, no files, no global RNG."""
