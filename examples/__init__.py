"""Runnable examples: the tasks `conveyor dev` loads, and one scenario per seed system."""
