"""No requirements: the bare interpreter runs this, with the run's params on stdin."""

import json
import os
import sys

params = json.load(sys.stdin)
name = params.get("name", "world")
print(f"{os.environ.get('GREETING', 'Hello')}, {name}!")
print(f"run {os.environ['CONVEYOR_RUN_ID']} attempt {os.environ['CONVEYOR_ATTEMPT']}")
