"""The ground floor: pieces every other package uses and that import no other gren package.

errors, paths, image I/O, checkpoint I/O, distributed helpers, atomic file writes, device choice,
batch collation and moving batches between devices.
"""
