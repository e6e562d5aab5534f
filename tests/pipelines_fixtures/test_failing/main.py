"""Fast-Flow-style pipeline that always fails with exit code 1."""

import os
import sys

print("test_failing: start")
print(f"failing because: {os.environ.get('FAILURE_REASON', 'unknown')}", file=sys.stderr)
sys.exit(1)
