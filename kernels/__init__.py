"""Device code: Triton kernels (tl/) and CUDA sources (cuda/), shipped as gpurnn._kernels."""
