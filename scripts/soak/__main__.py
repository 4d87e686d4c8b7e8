"""``python -m soak`` (from scripts/) does what scripts/soak.py does."""

import sys

from .cli import main

sys.argv[0] = "python -m soak"  # for the usage line
sys.exit(main())
