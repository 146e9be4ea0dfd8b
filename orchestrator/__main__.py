"""``python -m orchestrator`` is the ``insight-import`` command."""

import sys

from orchestrator.cli import main

sys.exit(main())
