"""bnstudy: measured, reproducible verdicts on what batch normalization does."""

import time as _time

IMPORTED_AT = _time.time()  # this process's first import of bnstudy: its Python has started (perf.timing)
