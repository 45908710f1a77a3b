"""The ``czsl-bench`` command: a thin Click layer over the Python API.

Sub-commands live in their own modules under ``czsl_bench.cli`` and are imported only when
invoked, so ``czsl-bench --help`` and shell completion never import torch.

Exit codes: 0 success, 1 a failed run or domain error (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute"; add a sub-command by adding a line here and a module beside this file.
SUBCOMMANDS: dict[str, str] = {
    "evaluate": "czsl_bench.cli.evaluate:evaluate",
    "explain": "czsl_bench.cli.explain:explain",
    "cache": "czsl_bench.cli.cache:cache",
    "data": "czsl_bench.cli.data:data",
    "info": "czsl_bench.cli.info:info",
    "list": "czsl_bench.cli.listing:list_command",
    "table": "czsl_bench.cli.table:table",
    "backbone": "czsl_bench.cli.backbone:backbone",
    "ablate": "czsl_bench.cli.ablate:ablate",
    "run": "czsl_bench.cli.run:run",
    "records": "czsl_bench.cli.records:records",
    "text": "czsl_bench.cli.text:text",
    "jobs": "czsl_bench.cli.jobs:jobs",
}


class LazyGroup(click.Group):
    """Click's documented lazy-loading group: sub-commands import on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except Exception as exc:  # one broken command must not take the others down
                return _broken_command(name, f"{type(exc).__name__}: {exc}")
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ValueError, LookupError, OSError) as exc:
            # Library errors are written to be read by a person: one line, exit 1, no traceback.
            raise click.ClickException(str(exc)) from None


def _broken_command(name: str, reason: str) -> click.Command:
    @click.command(name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True},
                   add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def broken(args) -> None:
        raise click.ClickException(f"the '{name}' command failed to load ({reason}); reinstall czsl-bench")

    return broken


@click.group(
    cls=LazyGroup,
    lazy=SUBCOMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CZSL_BENCH"},
)
@click.version_option(package_name="czsl-bench")
def cli() -> None:
    """Compositional zero-shot learning benchmark: methods, datasets, one evaluator.

    Shell completion: eval "$(_CZSL_BENCH_COMPLETE=bash_source czsl-bench)"
    """


def main() -> None:
    """Console-script entry point (Click's standalone mode: exit 0 / 1 / 2, errors as one line)."""
    cli.main(prog_name="czsl-bench")
