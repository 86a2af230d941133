"""The vocabulary: what a kernel computes and is specialized on (Mask, Features, KernelSpec,
Tiles), what is supported, the versions that name a build, and the PyTorch attention math
every reference and fallback computes.  Nothing here reads files, renders templates or runs
kernels."""
