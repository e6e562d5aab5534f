"""A small real dependency: humanize turns byte counts into words."""

import json
import os
import sys

import humanize

sizes = json.loads(os.environ["CONVEYOR_PARAMS"]).get("sizes", [1, 2048, 5_000_000, 3 * 10**9])
for size in sizes:
    print(f"{size:>12} bytes = {humanize.naturalsize(size, binary=True)}")
print(f"python: {sys.executable}")
