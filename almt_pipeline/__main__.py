"""``python -m almt_pipeline`` runs the ``almt`` command (as ``torchrun -m almt_pipeline`` does)."""

from .cli import main

if __name__ == "__main__":
    main()
