"""GPU fast paths, each beside its plain-PyTorch twin: fused LoRA (twin: methods/lora/layers),
RMSNorm/SwiGLU/RoPE (twin: the transformers modules), chunked cross-entropy (twin: F.cross_entropy)
and activation recomputation. Imports quant, config, errors."""
