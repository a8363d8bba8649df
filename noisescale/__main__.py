import sys

from noisescale.cli import main

sys.exit(main())
