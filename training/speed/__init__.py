"""GPU speed paths: attention kernels, compiled blocks, CUDA graphs."""
