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
import logging
import sys
from pathlib import Path

#: Exit status of a user error (bad flag, config, file, device); 1 is left for bugs.
USER_ERROR = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", action="append", default=[], help="release name (repeatable)")
    p.add_argument("--config", action="append", default=[], help="recipe .yaml/.json (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (YAML value), applied to every SAE")
    p.add_argument("--device", default=None,
                   help="shorthand for --set device=...: cpu, cuda, cuda:N or mps")
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
    p.add_argument("--debug", action="store_true", help="show the traceback of any error")
    return p.parse_args(argv)


def resolve_configs(args: argparse.Namespace) -> list:
    from llamascope_sdk.training.config import TrainConfig
    from llamascope_sdk.training.errors import TrainConfigError
    from llamascope_sdk.training.recipes import paper_overrides, recipe_for

    cfgs = [recipe_for(n) for n in args.sae] + [TrainConfig.load(c) for c in args.config]
    if not cfgs:
        raise TrainConfigError("nothing to train: no --sae NAME and no --config FILE",
                               hint="python training/run.py --list shows the 256 names")
    if args.paper:
        cfgs = [c.model_validate({**c.to_dict(), **paper_overrides(c)}) for c in cfgs]
    pairs = [*args.set, *([f"device={args.device}"] if args.device else [])]
    return [c.with_overrides(pairs) for c in cfgs]


def check_device(device: str) -> None:
    """Refuse a device this machine does not have before loading anything (DeviceError)."""
    from llamascope_sdk.base.devices import resolve_device

    resolve_device(device)


def check_data(cfgs: list) -> None:
    """Local dataset files and activation caches must exist before the model is loaded."""
    from llamascope_sdk.base.errors import DataFileNotFoundError
    from llamascope_sdk.corpus import local_paths
    from llamascope_sdk.training.errors import TrainConfigError

    for c in cfgs:
        if c.activation_cache:
            if not (Path(c.activation_cache) / "manifest.json").is_file():
                raise TrainConfigError(
                    f"activation_cache={c.activation_cache}: not an activation cache (no "
                    "manifest.json)", hint="build one with --make-cache DIR, or drop the setting")
            continue
        missing = [str(p) for p in local_paths(c.dataset) or [] if not p.is_file()]
        if missing:
            raise DataFileNotFoundError(
                f"dataset file(s) not found: {', '.join(missing)}",
                hint="--set dataset=PATH[,PATH...] (relative paths start at the current folder)")


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.list:
        from llamascope_sdk.loading.registry import list_saes

        print("\n".join(r.name for r in list_saes()))
        return
    cfgs = resolve_configs(args)
    if args.print_config:
        import json

        for c in cfgs:
            print(c.to_yaml() if args.format == "yaml" else json.dumps(c.to_dict(), indent=2))
        return
    for device in dict.fromkeys(c.device for c in cfgs):
        check_device(device)
    if args.make_cache:
        from llamascope_sdk.training.activations import LiveSource
        from llamascope_sdk.training.cache import write_cache
        from llamascope_sdk.training.sources import build_source

        cfgs = [c.model_copy(update={"activation_cache": None}) for c in cfgs]
        check_data(cfgs)
        src = build_source(cfgs)
        assert isinstance(src, LiveSource)  # activation_cache is off: a live source
        src.tokens.loop = False  # one pass over a local corpus
        info = {"recipe": cfgs[0].name, "model": cfgs[0].model, "dataset": cfgs[0].dataset}
        m = write_cache(src, args.make_cache, max_tokens=args.cache_tokens, info=info)
        print(f"cached {m['tokens']:,} tokens in {len(m['shards'])} shards at {args.make_cache}")
        return
    from llamascope_sdk.training.loop import train

    check_data(cfgs)
    for folder in train(cfgs, resume=not args.no_resume, max_steps=args.max_steps):
        print(f"exported {folder}")


def report(exc: BaseException) -> int:
    """One ``error:`` line and one ``hint:`` line on stderr; the exit status."""
    from pydantic import ValidationError

    from llamascope_sdk.base.errors import DataUnavailableError, LlamascopeError, UnknownSaeError
    from llamascope_sdk.training.config import describe

    if isinstance(exc, LlamascopeError):
        msg, hint, code = str(exc), exc.hint, USER_ERROR
        if hint is None and isinstance(exc, UnknownSaeError):
            hint = "python training/run.py --list shows the 256 names; use --config FILE for others"
        elif hint is None and isinstance(exc, DataUnavailableError):
            hint = "--set dataset=PATH[,PATH...] for local .txt/.jsonl/.parquet files"
    elif isinstance(exc, ValidationError):
        msg, hint, code = f"invalid recipe: {describe(exc)}", None, USER_ERROR
    elif isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError)):
        msg, hint, code = str(exc), "check the path", USER_ERROR
    else:
        msg = f"unexpected {type(exc).__name__}: {exc}"
        hint, code = "this looks like a bug: re-run with --debug and report the traceback", 1
    print(f"error: {' '.join(msg.split())}", file=sys.stderr)
    print(f"hint: {hint or 're-run with --debug for the traceback'}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for user errors, 1 for bugs)."""
    args = parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line (see --debug)
        if args.debug:
            raise
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
