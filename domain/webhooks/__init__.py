"""Signed webhooks in: endpoints, signature checks, batches, Fast-Flow's legacy keys."""
