import sys

from deit_fast.cli import main

sys.exit(main())
