"""Security: API tokens, stored secrets, encryption at rest, masking, the audit log."""
