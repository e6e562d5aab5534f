"""Fast-Flow-style pipeline with a requirement: imports it and reports where it came from."""

import os
import sys

import six

print(f"six {six.__version__}")
print(f"prefix {sys.prefix}")
print(os.environ.get("GREETING", ""))
