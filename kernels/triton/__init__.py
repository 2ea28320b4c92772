"""Triton kernels, one family per file: @triton.jit kernels, then their launch functions."""
