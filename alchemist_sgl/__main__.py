"""`python -m alchemist_sgl` = `alchemist-sgl`."""

import sys

from alchemist_sgl.cli import main

sys.exit(main())
