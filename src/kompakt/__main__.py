"""`python -m kompakt` (also what `accelerate launch -m kompakt` runs)."""

from kompakt.cli.app import main

main()
