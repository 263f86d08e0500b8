"""LoRA: layers and merge math (layers.py), building it into a model (inject.py), PEFT's file
format (peft_format.py), combining adapters (combine.py) and --method lora/qlora (recipe.py)."""
