"""Services every zoo method shares: loading members, representation similarity, block latency."""
