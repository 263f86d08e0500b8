"""`python -m slimtune …` runs the command line."""

from slimtune.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
