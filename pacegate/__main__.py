import sys

from pacegate.cli import main

sys.exit(main())
