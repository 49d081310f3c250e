import sys

from pyface.cli import main

sys.exit(main())
