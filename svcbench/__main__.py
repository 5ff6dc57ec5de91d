import sys

from svcbench.cli import main

sys.exit(main())
