"""Training: data, the loop, losses, checkpoints, optimizers, the GPU memory plan, the run log,
torchrun/FSDP2, and --method setup. Imports models, adapter_dir, methods, adapters, kernels, quant, config, errors."""
