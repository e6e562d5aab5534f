"""Fast-Flow-style pipeline with no requirements: print and exit 0."""

import os
import platform

print("test_simple: start")
print(f"python {platform.python_version()}")
print(f"TEST_ENV_VAR={os.environ.get('TEST_ENV_VAR', 'unset')}")
print(f"STAGE={os.environ.get('STAGE', 'unset')}")
print("test_simple: done")
