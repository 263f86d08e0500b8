"""One module per method (lora/, dora, ia3, prompt, bottleneck, full) and the one table that lists
them all (table.py). Imports adapters, kernels, quant, config and errors; never files or training."""
