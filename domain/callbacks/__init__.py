"""Callbacks and notifications out: rules, allowed URLs, messages, signed delivery."""
