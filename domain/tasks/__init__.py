"""Tasks: the registry of `@task` functions, their params schemas, and the catalog."""
