import sys

from dqmig.cli import main

sys.exit(main())
