"""`python -m client` = the `client` console script."""

from client.cli import main

main()
