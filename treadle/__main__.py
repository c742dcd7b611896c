"""`python -m treadle` is the `treadle` command."""

from treadle.cli import main

main()
