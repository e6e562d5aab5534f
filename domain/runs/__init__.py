"""Runs: requests, enqueue, claim and finish, chains, relay and reaper, states and views."""
