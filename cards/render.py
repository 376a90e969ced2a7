"""Render the model cards of all 256 Llama Scope checkpoints (plus the demo card).

    python cards/render.py OUT_DIR [--metrics results.json] [--no-demo]

``results.json`` maps SAE names to metric dicts, e.g. ``{name: r.to_dict() for name, r in
evaluate(...).items()}``. The work is done by :func:`llamascope_sdk.loading.cards.render_all`.
"""

from __future__ import annotations

import argparse

from llamascope_sdk.loading.cards import render_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder that receives <name>/README.md")
    parser.add_argument("--metrics", help="JSON file: {sae name: metrics dict}")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo custom-SAE card")
    args = parser.parse_args(argv)
    paths = render_all(args.out_dir, args.metrics, demo=not args.no_demo)
    print(f"wrote {len(paths)} cards under {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
