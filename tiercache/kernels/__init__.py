"""Compute kernels (Triton where available), each with a torch reference implementation."""
