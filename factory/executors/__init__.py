"""Executors: where jobs run (this machine, or a remote build host)."""
