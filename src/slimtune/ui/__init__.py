"""`slimtune ui`: the local web app (optional extra `slimtune[ui]`, Gradio).

It imports training, evaluate, models, adapter_dir and below, never cli; the commands it
starts (train, eval, export, compare) run as `slimtune …` child processes.
"""
