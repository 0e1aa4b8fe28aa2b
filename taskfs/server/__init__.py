"""The embedded local task service: REST app, SQLite store, runner, storage."""
