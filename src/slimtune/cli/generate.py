"""`slimtune generate`: stream a model's answer to a prompt.

slimtune generate --model smollm2-135m --adapter runs/demo/adapter --prompt "…"
"""

from __future__ import annotations

import argparse
import sys

from slimtune.errors import SlimtuneError


def run(args: argparse.Namespace) -> int:
    from slimtune.cli.train import quiet_transformers
    from slimtune.evaluate import generate, load_for_inference

    if args.max_new_tokens <= 0:
        raise SlimtuneError(
            f"--max-new-tokens {args.max_new_tokens} is not accepted: an integer > 0"
        )
    if args.temperature < 0:
        raise SlimtuneError(f"--temperature {args.temperature} is not accepted: a number >= 0")
    if args.seed is not None and args.temperature == 0:
        raise SlimtuneError(
            f"--seed {args.seed} needs --temperature > 0: greedy decoding draws nothing"
        )
    quiet_transformers(quiet=True)
    model, tokenizer = load_for_inference(args.model, args.adapter)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    text = generate(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, raw=args.raw, stream=write, seed=args.seed or 0,
    )  # fmt: skip
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0
