#!/usr/bin/env python
"""Train (or cache activations for) Llama Scope SAEs: the reproduction entry point.

Examples::

    python training/run.py --sae L15R-8x --print-config            # the released recipe
    python training/run.py --sae L15R-8x --paper --print-config    # paper values instead
    python training/run.py --sae L12M-128k --set lr=4e-4 --set total_tokens=1e8
    python training/run.py --sae L12R-8x --sae L12M-8x --sae L12TC-8x   # one LM pass, 3 SAEs
    python training/run.py --config training/recipes/smollm2-135m-L15R-8x.yaml --make-cache DIR
    torchrun --nproc_per_node 2 training/run.py --config my.yaml    # data-parallel
    python training/run.py --list                                  # all 256 recipe names
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", action="append", default=[], help="release name (repeatable)")
    p.add_argument("--config", action="append", default=[], help="recipe .yaml/.json (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (YAML value), applied to every SAE")
    p.add_argument("--paper", action="store_true",
                   help="use the paper's values where it disagrees with the released script")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe(s)")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--list", action="store_true", help="list the 256 recipe names")
    p.add_argument("--make-cache", metavar="DIR", help="only cache activations into DIR")
    p.add_argument("--cache-tokens", type=int, default=None, help="stop caching after N tokens")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (the schedule still spans total_tokens)")
    return p.parse_args(argv)


def resolve_configs(args: argparse.Namespace) -> list:
    from llamascope_sdk.training.config import TrainConfig
    from llamascope_sdk.training.recipes import paper_overrides, recipe_for

    cfgs = [recipe_for(n) for n in args.sae] + [TrainConfig.load(c) for c in args.config]
    if not cfgs:
        sys.exit("error: give at least one --sae NAME or --config FILE (see --list)")
    if args.paper:
        cfgs = [c.model_validate({**c.to_dict(), **paper_overrides(c)}) for c in cfgs]
    try:
        return [c.with_overrides(args.set) for c in cfgs]
    except ValueError as exc:
        sys.exit(f"error: {exc}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        from llamascope_sdk.registry import list_saes

        print("\n".join(r.name for r in list_saes()))
        return
    cfgs = resolve_configs(args)
    if args.print_config:
        import json

        for c in cfgs:
            print(c.to_yaml() if args.format == "yaml" else json.dumps(c.to_dict(), indent=2))
        return
    if args.make_cache:
        from llamascope_sdk.training.cache import write_cache
        from llamascope_sdk.training.sources import build_source

        src = build_source([c.model_copy(update={"activation_cache": None}) for c in cfgs])
        src.tokens.loop = False  # one pass over a local corpus
        info = {"recipe": cfgs[0].name, "model": cfgs[0].model, "dataset": cfgs[0].dataset}
        m = write_cache(src, args.make_cache, max_tokens=args.cache_tokens, info=info)
        print(f"cached {m['tokens']:,} tokens in {len(m['shards'])} shards at {args.make_cache}")
        return
    from llamascope_sdk.errors import LlamascopeError
    from llamascope_sdk.training.trainer import train

    try:
        for folder in train(cfgs, resume=not args.no_resume, max_steps=args.max_steps):
            print(f"exported {folder}")
    except LlamascopeError as exc:  # offline dataset, gated model, ...: one clear line
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
