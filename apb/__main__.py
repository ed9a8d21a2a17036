import sys

from apb.cli import main

sys.exit(main())
