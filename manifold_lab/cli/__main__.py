"""``python -m manifold_lab.cli`` (used by ``torchrun -m manifold_lab.cli ...``)."""

from manifold_lab.cli import main

main()
