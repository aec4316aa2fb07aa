"""The search driver: evaluation pools, workers and the ask -> dispatch -> tell loop."""
