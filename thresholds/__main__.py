"""``python -m thresholds ...`` is ``python -m thresholds.calibrate ...``."""
import sys

from thresholds.calibrate import main

sys.exit(main())
