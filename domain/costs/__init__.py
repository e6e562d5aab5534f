"""Costs: the ledger, prices, projects with monthly limits, admission at claim, reports."""
