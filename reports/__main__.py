"""`python -m reports RUN_DIR [--compare OLDER_RUN_DIR] [-o FILE] [--json]`: the report without
the CLI (with --compare: exit 1 when a tracked metric regressed, as `svcbench report`)."""

import sys

from reports.render import main

sys.exit(main())
