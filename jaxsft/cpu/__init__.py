"""What exists only to make XLA:CPU fast: convolution algorithms, oneDNN calls, XLA:CPU flags,
malloc tuning."""
