"""qwen2rt.kernels: Triton kernels, each file with its launcher and PyTorch reference (see the kernel issues).

Empty in the foundation: the model runs on the pure-PyTorch backend in qwen2rt.models.backend."""
