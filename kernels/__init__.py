"""Device code: Triton kernels (triton/) and CUDA sources (cuda/), imported as gpurnn.kernels
(the mapping is explained in gpurnn/__init__.py)."""
