"""Using a trained model elsewhere: a merged transformers directory, GGUF models and LoRAs, an
Ollama Modelfile. Imports training, adapter_dir, models, methods, adapters, quant, config, errors."""
