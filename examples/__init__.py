"""Networks of your own, plugged in with ``arch package.module:callable`` (docs/extending.md)."""
