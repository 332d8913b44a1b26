"""`python -m tunelab` (what `accelerate launch -m tunelab train ...` runs)."""

from tunelab.cli import main

main()
