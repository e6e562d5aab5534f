"""Prints SHAPED_TOKEN (quotes, backslashes, non-ASCII) in every shape, and names an artifact
after FILE_TOKEN (plain ASCII); with {"fail": true} on stdin it then fails, quoting it."""

import base64
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import quote, quote_plus, urlencode

secret = os.environ["SHAPED_TOKEN"]
file_token = os.environ["FILE_TOKEN"]
params = json.loads(sys.stdin.read() or "{}")
PREFIX = os.environ["CONVEYOR_EVENT_PREFIX"]


def event(ascii_only: bool = True, **payload: object) -> None:
    print(PREFIX + json.dumps(payload, ensure_ascii=ascii_only), flush=True)


print("plain:", secret)
print(json.dumps({"token": secret}))
print(json.dumps({"token": secret}, ensure_ascii=False))
print(json.dumps({"body": json.dumps({"token": secret})}))
print("repr:", repr(secret), repr({"token": secret}), [secret])
print("url:", quote(secret), quote(secret, safe=""), quote_plus(secret), urlencode({"t": secret}))
print("base64:", base64.b64encode(secret.encode()).decode())
print("stderr:", secret, json.dumps(secret), file=sys.stderr)
# A line over 64 KiB is cut inside the value: its start must not stay behind.
print("x" * 65530 + secret)
if not params.get("fail"):  # (it would push the failure's own message out of its error)
    print("x" * 65530 + secret, file=sys.stderr)
logging.basicConfig(level=logging.INFO)
logging.getLogger("careless").warning("logged %r", secret)

event(event="step", name=f"step {secret}")
event(event="log", message=f"log {secret}", level="warning", fields={secret: [secret], "k": secret})
event(False, event="metric", name=f"metric {secret}", value=1, labels={"label": secret, secret: 1})
event(False, event="cost", provider=f"p-{secret}", model=f"m-{secret}", tokens_in=1, usd="0")
event(event="step_end", status="failed", detail=f"detail {secret}")
event(event="step", name="x" * 195 + secret)  # cut to 200 characters after masking, not before
# Every character escaped: only decoding shows the value.
escaped = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in secret)
print(PREFIX + '{"event": "log", "message": "' + escaped + '"}', flush=True)
event(event="no-such-event", value=secret)  # kept as a line, with a warning
event(event="log", message=json.dumps({"token": secret}), fields={"repr": repr(secret)})

artifacts = Path(os.environ["CONVEYOR_ARTIFACTS_DIR"])
(artifacts / f"report-{file_token}.txt").write_text("made with a secret in its name\n")
(artifacts / f"q-{quote(secret, safe='')}.bin").write_bytes(b"\x00")
(artifacts / f"dir-{file_token}").mkdir(exist_ok=True)
(artifacts / f"dir-{file_token}" / "inner.txt").write_text("inside\n")

if params.get("fail"):
    raise SystemExit(f"failing with {secret!r} and {json.dumps(secret)}")
event(False, event="result", value={"token": secret, secret: [repr(secret)], "file": file_token})
