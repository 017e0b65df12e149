"""The ``mlc-magicdec`` command line: one small module per command, each parsing its options and handing
off to one function of ``mlc_magicdec.interface`` (or of the library)."""

from __future__ import annotations

import click

from .bench import bench
from .compile import compile_cmd, fetch_model_cmd, link_cmd
from .demo import demo_cmd
from .generate import generate_cmd
from .plan import plan_cmd
from .serve import serve_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlc-magicdec")
def main() -> None:
    """MagicDec speculative decoding, compiled through Apache TVM."""


for command in (fetch_model_cmd, compile_cmd, link_cmd, generate_cmd, demo_cmd, serve_cmd, bench, plan_cmd):
    main.add_command(command)

__all__ = ["main"]
