"""Makes `platform/` a package, as some monorepos do.

It is named like Python's standard `platform` module: the runner keeps the repository behind
the standard library on `sys.path`, so tasks that import `uuid` (which uses `platform`) work.
"""
