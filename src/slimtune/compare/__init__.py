"""Comparing methods on one model and data: plan the runs (settings), run them (run, measure),
aggregate seeds (stats), write the report, its sentences (findings) and its charts.
Imports evaluate, training, adapter_dir, models, methods, adapters, quant, config, errors."""
