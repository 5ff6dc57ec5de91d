"""`python -m reports RUN_DIR [--compare OLDER_RUN_DIR] [-o FILE]`: the report without the CLI."""

import sys

from reports.render import main

sys.exit(main())
