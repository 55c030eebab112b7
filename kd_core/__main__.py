import sys

from kd_core.cli import main

sys.exit(main())
