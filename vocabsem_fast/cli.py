"""The ``vocabsem`` command line."""

from __future__ import annotations

import argparse
import sys


def _lens(args: argparse.Namespace) -> int:
    from .bases import SemanticBasis
    from .lens import format_lens_table, vocabulary_lens
    from .models import load_model
    from .progress import step

    _quiet_transformers()
    model, tokenizer = load_model(args.model)
    with step("semantic bases (computed once per model, then read from the cache)"):
        basis = SemanticBasis.from_model(model, tokenizer=tokenizer)
    rows = vocabulary_lens(model, tokenizer, basis, args.prompt, k=args.k)
    print(f"prompt: {args.prompt!r}   (last position; {len(rows) - 1} layers; similarity to semantic bases)")
    print(format_lens_table(rows))
    return 0


def _quiet_transformers() -> None:
    """Our own one-line steps replace transformers' per-tensor progress bars and notices."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vocabsem", description="Vocabulary-defined semantics, fused.")
    sub = parser.add_subparsers(dest="command", required=True)
    lens = sub.add_parser("lens", help="top-k vocabulary tokens of each layer's last hidden state")
    lens.add_argument("prompt")
    lens.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a path or a HF name")
    lens.add_argument("--k", type=int, default=5, help="tokens per layer (default 5)")
    lens.set_defaults(run=_lens)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "k", 1) < 1:
        print("vocabsem: --k must be at least 1", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
