import sys

from emalib.cli import main

sys.exit(main())
