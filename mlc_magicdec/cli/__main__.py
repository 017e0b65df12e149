"""``python -m mlc_magicdec.cli``: the same as ``mlc-magicdec``."""

from . import main

main(prog_name="mlc-magicdec")
