"""Entry point of the `dsv2` command."""

from __future__ import annotations

import typer

from dsv2cli import __version__
from dsv2cli.cli import cache_report, generate, info
from dsv2cli.cli import convert as convert_cmd
from dsv2cli.cli import download as download_cmd
from dsv2cli.cli import expert_stats as expert_stats_cmd
from dsv2cli.cli import serve as serve_cmd
from dsv2cli.cli import train as train_cmd
from dsv2cli.cli import verify as verify_cmd

app = typer.Typer(
    name="dsv2",
    help="Run, convert, measure and understand DeepSeek-V2-family models (MLA + DeepSeekMoE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsv2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Run, convert, measure and understand DeepSeek-V2-family models (MLA + DeepSeekMoE)."""


app.command("generate", epilog=generate.EPILOG)(generate.generate)
app.command("info", epilog=info.EPILOG)(info.info)
app.command("train", epilog=train_cmd.EPILOG)(train_cmd.train_command)
app.command("cache-report", epilog=cache_report.EPILOG)(cache_report.cache_report)
app.command("expert-stats", epilog=expert_stats_cmd.EPILOG)(expert_stats_cmd.expert_stats)
app.command("download", epilog=download_cmd.EPILOG)(download_cmd.download)
app.command("convert", epilog=convert_cmd.EPILOG)(convert_cmd.convert)
app.command("verify", epilog=verify_cmd.EPILOG)(verify_cmd.verify)
app.command("serve", epilog=serve_cmd.EPILOG)(serve_cmd.serve)


def main() -> None:
    app()
