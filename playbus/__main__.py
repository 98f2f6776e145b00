import sys

from playbus.cli import main

sys.exit(main())
