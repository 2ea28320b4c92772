"""CUDA C++ sources that the cupy backend compiles at run time with NVRTC."""
