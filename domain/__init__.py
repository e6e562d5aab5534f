"""conveyor's core: models, settings, persistence and services, free of any framework."""
