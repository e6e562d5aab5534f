"""Directory pipelines: pipeline.json, discovery, environments, and their table."""
