"""The remote-ZIP reader: index parsing, ranged I/O, caches, member readers."""
