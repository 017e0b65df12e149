"""What each command does, as library functions: load, run, print, write.

``mlc_magicdec.cli`` only parses options and calls one function here (as MLC-LLM's ``cli/serve.py`` hands
off to ``interface/serve.py``), so an app or a notebook can run the same thing without a shell.
"""
