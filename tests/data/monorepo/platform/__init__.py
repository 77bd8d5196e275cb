"""Makes `platform/` a package, as some monorepos do.

It is named like the standard library's `platform` module and has none of its functions: a
task that can see it ahead of the standard library fails as soon as anything imports
`uuid` (which calls `platform.system()`).
"""
