"""Core (the lowest layer): errors, atomic file I/O, paths, progress bars, and the params schema with the defenses'
config blocks. Imports nothing else from emalib and no heavy framework (docs/architecture.md)."""
