"""Comparing methods on one model and data: run the jobs, write the report and its charts.
Imports evaluate, training, adapter_dir, models, methods, adapters, quant, config, errors."""
