"""`python -m trainer ...` (and `torchrun -m trainer ...`) run the trainer command line."""

from trainer.cli import main

main()
