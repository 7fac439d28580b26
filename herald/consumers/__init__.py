"""The read side: consumer registry and offsets, the daemon, delivery semantics, retry and
parking, built-in consumers (jsonl, webhook, command) and metrics (issue #4).

Imports :mod:`herald.outbox` and :mod:`herald.schema` only.
"""
