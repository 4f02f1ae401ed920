"""Test helpers (imported as ``helpers.<module>``; ``tests/`` is on ``sys.path`` under pytest)."""
