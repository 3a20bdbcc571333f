import sys

from megatron_eps.calibrate.cli import main

sys.exit(main())
