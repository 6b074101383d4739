import sys

from pocketquant.cli import main

sys.exit(main())
