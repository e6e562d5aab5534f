"""Fast-Flow-style logging pipeline: print() and the logging module, spread over time."""

import logging
import os
import time

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(message)s")
log = logging.getLogger("test_logging")

count = int(os.environ.get("LINES", "5"))
for i in range(1, count + 1):
    print(f"stdout line {i} of {count}")
    log.info("stderr line %d of %d", i, count)
    time.sleep(0.05)
log.warning("a warning on stderr does not fail the run")
print("test_logging: done")
