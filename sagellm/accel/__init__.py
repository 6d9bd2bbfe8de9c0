"""Acceleration: optional compiled kernels (paged decode attention on the CPU)."""
