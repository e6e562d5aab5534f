"""Artifacts and events: the SDK's steps, metrics and costs without importing conveyor."""

import csv
import json
import os
import random
from pathlib import Path

PREFIX = os.environ.get("CONVEYOR_EVENT_PREFIX", "::conveyor::")


def emit(event: str, **fields: object) -> None:
    print(PREFIX + json.dumps({"event": event, **fields}), flush=True)


params = json.loads(os.environ.get("CONVEYOR_PARAMS", "{}"))
rows = int(params.get("rows", 50))

emit("step", name="generate")
rng = random.Random(rows)
data = [(i, round(rng.uniform(1, 100), 2)) for i in range(rows)]
emit("metric", name="rows", value=len(data), labels={"source": "generated"})

emit("step", name="write report")
out = Path(os.environ["CONVEYOR_ARTIFACTS_DIR"]) / "report.csv"
with out.open("w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["id", "amount"])
    writer.writerows(data)
emit("step_end", status="completed")

emit("cost", provider="example", model="mini", tokens_in=420, tokens_out=36, usd="0.0005")
total = round(sum(amount for _, amount in data), 2)
emit("log", message="report written", level="info", fields={"file": out.name, "total": total})
emit("result", value={"rows": len(data), "total": total, "file": out.name})
