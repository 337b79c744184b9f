"""What the services share: TLS and token auth, PHI-safe request logs, health and shutdown plumbing."""
