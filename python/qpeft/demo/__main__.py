"""python -m qpeft.demo: the same as `qpeft demo`."""
import sys

from .main import main

sys.exit(main(prog="python -m qpeft.demo"))
