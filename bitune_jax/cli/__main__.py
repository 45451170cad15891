"""``python -m bitune_jax.cli`` is the ``bitune-jax`` command."""
import sys

from bitune_jax.cli import main

sys.exit(main())
