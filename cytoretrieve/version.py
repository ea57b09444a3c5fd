"""The package's version, in a module of its own: the store, the jobs and the CLI record it without importing the
package root (whose lazy top-level API names the jobs)."""

__version__ = "0.1.0"
