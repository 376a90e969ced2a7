"""Commands about the checkpoints themselves: list, info, download, cards."""

from __future__ import annotations

from typing import Annotated

import typer

from llamascope_sdk.cli.app import JsonOpt, RevisionOpt, app, command, echo_json, table


@app.command("list")
@command
def list_cmd(layer: Annotated[int | None, typer.Option(help="Only this layer (0-31).", show_default=False)] = None,
             position: Annotated[str | None, typer.Option(help="Only this position: R, A, M or TC.", show_default=False)] = None,
             width: Annotated[str | None, typer.Option(help="Only this width: 8x/32k or 32x/128k.", show_default=False)] = None,
             as_json: JsonOpt = False) -> None:
    """List the 256 Llama Scope checkpoints (filterable)."""
    from llamascope_sdk.loading.registry import list_saes

    refs = list_saes(layer=layer, position=position, width=width)
    if as_json:
        echo_json([r.as_dict() for r in refs])
        return
    table(f"{len(refs)} Llama Scope checkpoints", ["name", "repo", "folder", "hook in", "hook out", "d_sae"],
          [[r.name, r.repo_id(), r.subfolder(), r.hook_point_in, r.hook_point_out, r.d_sae] for r in refs])


@app.command()
@command
def info(name: Annotated[str, typer.Argument(help="SAE name, local folder or 'demo'.")],
         revision: RevisionOpt = None, as_json: JsonOpt = False,
         offline: Annotated[bool, typer.Option(help="Only registry facts; no Hub request.")] = False) -> None:
    """Facts about one SAE: repo, folder, hook points, width, dataset norms, threshold, links."""
    from llamascope_sdk.loading.info import sae_info

    facts = sae_info(name, revision=revision, fetch=not offline)
    if as_json:
        echo_json(facts)
        return
    table(facts.get("name", name), ["field", "value"], [[k, v] for k, v in facts.items() if k != "card"])


@app.command()
@command
def download(names: Annotated[list[str], typer.Argument(help="One or more SAE names.")],
             revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Download SAEs into the Hugging Face cache (an interrupted download resumes)."""
    from llamascope_sdk.loading.hub import download as fetch

    done = []
    for n in names:
        got = fetch(n, revision=revision)
        done.append({"name": n, "folder": str(got.folder), "commit": got.source.commit})
        if not as_json:
            typer.echo(f"{n}: {got.folder} (commit {got.source.commit})")
    if as_json:
        echo_json(done)


@app.command()
@command
def cards(out_dir: Annotated[str, typer.Argument(help="Folder to write one README.md per checkpoint into.")],
          as_json: JsonOpt = False) -> None:
    """Render the model card of every Llama Scope checkpoint."""
    from llamascope_sdk.loading.cards import render_all

    paths = render_all(out_dir)
    if as_json:
        echo_json({"out_dir": out_dir, "cards": [str(p) for p in paths]})
        return
    typer.echo(f"wrote {len(paths)} cards under {out_dir}")
