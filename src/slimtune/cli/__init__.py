"""The command line: the parser (main.py) and one module per command. Imports anything below."""
