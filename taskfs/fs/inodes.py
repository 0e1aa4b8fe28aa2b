"""The inode table: numbers for nodes, exact lookup counts, ``forget``.

Owns: which inode number stands for which node, and for how long.

Must stay true:
* inode numbers are handed out by a counter and never reused, so a stale kernel reference can
  never reach a different node;
* a node keeps its number while the kernel holds references to it (its lookup count), and only
  ``forget`` releases it; the root is never released;
* every reply that hands an inode to the kernel (lookup, create, each accepted readdirplus
  entry) adds exactly one to its count (``ref``); ``forget(inode, n)`` takes ``n`` away and
  drops the entry at zero, after which the same node gets a new number on its next lookup.

Nodes are any hashable keys that say what they are (the tree's are ``taskfs.fs.nodes``); the
table is FUSE-free.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Generic, NewType, TypeVar

log = logging.getLogger(__name__)

Inode = NewType("Inode", int)
ROOT_INODE = Inode(1)


Key = TypeVar("Key", bound=Hashable)


class InodeTable(Generic[Key]):
    """Bidirectional map ``Inode <-> node`` with lookup counts; ``root`` is inode 1."""

    def __init__(self, root: Key) -> None:
        self._next = ROOT_INODE + 1
        self._by_inode: dict[Inode, Key] = {ROOT_INODE: root}
        self._by_key: dict[Key, Inode] = {root: ROOT_INODE}
        self._counts: dict[Inode, int] = {}

    def __len__(self) -> int:
        """Inodes known besides the root."""
        return len(self._by_inode) - 1

    def inode_for(self, key: Key) -> Inode:
        """The inode of ``key``, assigning a new number if it has none (count unchanged)."""
        inode = self._by_key.get(key)
        if inode is None:
            inode = Inode(self._next)
            self._next += 1
            self._by_key[key] = inode
            self._by_inode[inode] = key
            self._counts[inode] = 0
        return inode

    def key(self, inode: Inode) -> Key | None:
        return self._by_inode.get(inode)

    def ref(self, inode: Inode) -> None:
        """The kernel got one more reference to ``inode``."""
        if inode != ROOT_INODE:
            self._counts[inode] += 1

    def count(self, inode: Inode) -> int:
        return self._counts.get(inode, 0)

    def drop_unreferenced(self, inode: Inode) -> None:
        """Release a number assigned for a reply the kernel never accepted."""
        if inode != ROOT_INODE and self._counts.get(inode) == 0:
            self._remove(inode)

    def forget(self, inode: Inode, nlookup: int) -> None:
        if inode == ROOT_INODE:
            return
        count = self._counts.get(inode)
        if count is None:
            log.warning("forget of unknown inode %d", inode)
            return
        if nlookup > count:
            log.warning("forget(%d, %d) exceeds its lookup count %d", inode, nlookup, count)
            nlookup = count
        if count == nlookup:
            self._remove(inode)
        else:
            self._counts[inode] = count - nlookup

    def _remove(self, inode: Inode) -> None:
        key = self._by_inode.pop(inode)
        del self._by_key[key]
        del self._counts[inode]
