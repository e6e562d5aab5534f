"""Only the secrets named in pipeline.json are injected, as environment variables."""

import hashlib
import os

token = os.environ["API_TOKEN"]
fingerprint = hashlib.sha256(token.encode()).hexdigest()[:12]
print(f"got a token of {len(token)} characters (sha256 {fingerprint}...)")
# Careless code: conveyor masks the value before the line is stored.
print(f"the token is {token}")
