import sys

from noisescale.app.cli import main

sys.exit(main())
