import sys

from saediff.cli import main

sys.exit(main())
