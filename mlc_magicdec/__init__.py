"""mlc-magicdec: MagicDec speculative decoding compiled through Apache TVM."""

__version__ = "0.1.0"
