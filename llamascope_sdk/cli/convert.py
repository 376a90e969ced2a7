"""``llamascope convert``: write an SAE (or a transcoder set) in another tool's format."""

from __future__ import annotations

from typing import Annotated

import typer

from llamascope_sdk.cli.app import JsonOpt, RevisionOpt, app, command, echo_json

_TARGETS = "release, saelens, llamascopium or circuit-tracer"


@app.command()
@command
def convert(src: Annotated[str, typer.Argument(help=(
                "Source: a Llama Scope name, 'demo', a local folder (release layout, SAELens, "
                "Llamascopium or sparsify) or a Hub org/repo[/subfolder]. For --to "
                "circuit-tracer: LXTC-8x, LXTC-32x or a comma-separated list of transcoders."))],
            out: Annotated[str, typer.Argument(help="Folder to write.")],
            to: Annotated[str, typer.Option("--to", help=f"Target format: {_TARGETS}.")],
            from_format: Annotated[str | None, typer.Option(
                "--from", help="Source format, when detection should be skipped: release, "
                               "saelens, llamascopium or sparsify.", show_default=False)] = None,
            hook_point: Annotated[str | None, typer.Option(
                "--hook-point", help="sparsify: the TransformerLens hook name to use instead of "
                                     "the one read from the folder name.", show_default=False)] = None,
            rmsnorm_gain: Annotated[str | None, typer.Option(
                "--rmsnorm-gain", help="sparsify MLP transcoders: a .safetensors file holding "
                                       "that layer's post_attention_layernorm weight.",
                show_default=False)] = None,
            norm_scaling_factor: Annotated[float | None, typer.Option(
                "--norm-scaling-factor", help="SAELens 'expected_average_only_in' SAEs: the "
                                              "factor to fold in.", show_default=False)] = None,
            dtype: Annotated[str | None, typer.Option(
                "--dtype", help="circuit-tracer: dtype of the written tensors. [default: float32]",
                show_default=False)] = None,
            hub_repo: Annotated[str | None, typer.Option(
                "--hub-repo", help="circuit-tracer: the repo the set will be uploaded to "
                                   "(config.yaml then lists hf:// paths).", show_default=False)] = None,
            revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Convert between the release layout and SAELens / Llamascopium / sparsify /
    circuit-tracer formats (exact: same features fire, same reconstructions)."""
    from llamascope_sdk.loading.convert import convert as run

    gain = _read_gain(rmsnorm_gain) if rmsnorm_gain else None
    folder = run(src, to, out, fmt=from_format, revision=revision, dtype=dtype, hub_repo=hub_repo,
                 hook_point=hook_point, rmsnorm_gain=gain, norm_scaling_factor=norm_scaling_factor)
    if as_json:
        echo_json({"src": src, "to": to, "out": str(folder)})
        return
    typer.echo(f"wrote {to} folder {folder}")


def _read_gain(path: str):  # -> torch.Tensor
    from safetensors.torch import load_file

    if not path.endswith(".safetensors"):
        raise ValueError(f"--rmsnorm-gain {path}: give a .safetensors file holding the gain")
    tensors = load_file(path)
    if len(tensors) != 1:
        raise ValueError(f"{path} holds {len(tensors)} tensors; give a file with the gain only")
    return next(iter(tensors.values()))
