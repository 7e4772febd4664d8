"""Pure tensor functions: no I/O, no model walking. Passes orchestrate these."""
