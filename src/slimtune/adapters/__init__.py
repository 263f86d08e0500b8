"""What every method shares: PEFT's target rules, in-place layer replacement, named adapters
(set, delete, disable, merge) and PEFT's key conventions. Imports only kernels, quant, config, errors."""
