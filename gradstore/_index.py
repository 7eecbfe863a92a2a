"""The in-memory index: example ID -> (segment, position), rebuilt from the manifests on open.

Manifests are the only source of truth. A manifest may list segments it `replaces` (an erasure rewrite, a
compaction); those are dead even if their own manifests still exist (a crash between "commit the new
manifest" and "delete the old one"). If an ID occurs in several live segments (a replaced example whose old
copy is not yet removed, or two processes appending the same ID), the copy in the latest segment wins.

"Latest" is the copy's *commit order* (`Manifest.copy_order`), not the time its files were written: a writer's
segment may be written before, and committed after, a compaction that read the older copy of one of its IDs. A
writer's commit takes the time of the commit (and at least one more than any order it knows of); a rewrite or a
merge keeps every copy's own order, so that moving a copy never makes it newer than one committed after it.
Live segments are listed by their own order (a rewrite keeps its source's, a merge takes the latest of its
sources'); where two copies of an ID meet, their copy orders decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._encoding import ExampleId
from ._segment import Manifest


@dataclass
class Index:
    manifests: dict[str, Manifest] = field(default_factory=dict)  # every manifest present, live or not
    live: list[str] = field(default_factory=list)  # live segment IDs, in commit order (oldest first)
    locate: dict[ExampleId, tuple[str, int]] = field(default_factory=dict)
    shadowed: int = 0  # copies of IDs hidden by a newer copy
    # Copies (segment, position) that a journaled erasure means but no rewrite has removed yet (a crashed
    # erasure seen by a handle that may not finish it): an ID whose current copy is one of them is not live.
    pending_erasure: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def build(cls, manifests: dict[str, Manifest],
              pending_erasure: frozenset[tuple[str, int]] = frozenset()) -> Index:
        index = cls(manifests=dict(manifests), pending_erasure=pending_erasure)
        dead = {old for m in manifests.values() for old in m.replaces}
        index.live = sorted((s for s in manifests if s not in dead), key=lambda s: manifests[s].order_key)
        for segment in index.live:
            index._add_entries(manifests[segment])
        # Only once every copy has competed: a pending copy that is the current one hides its ID (older copies
        # are in the erasure's segments too), while a copy appended after the erasure was asked for wins and stays.
        for segment, position in pending_erasure:
            if segment in manifests:
                example_id = manifests[segment].ids[position]
                if index.locate.get(example_id) == (segment, position):
                    del index.locate[example_id]
        return index

    def _add_entries(self, manifest: Manifest) -> None:
        for position, example_id in enumerate(manifest.ids):
            found = self.locate.get(example_id)
            if found is not None:
                self.shadowed += 1
                other = self.manifests[found[0]]
                if (other.copy_order(found[1]), other.order_key) > (manifest.copy_order(position), manifest.order_key):
                    continue  # the copy already indexed was committed later: it stays current
            self.locate[example_id] = (manifest.segment, position)

    def latest_order(self) -> int:
        """The largest commit order of any live copy (0 for an empty store)."""
        return max((self.manifests[s].latest_order for s in self.live), default=0)

    def snapshot(self) -> Index:
        """A copy that later commits and retirements on this handle do not change (for iterating)."""
        return Index(dict(self.manifests), list(self.live), dict(self.locate), self.shadowed, self.pending_erasure)

    def superseded(self) -> list[str]:
        """Segments whose manifests still exist but that a newer manifest replaces (to be cleaned up)."""
        live = set(self.live)
        return sorted(s for s in self.manifests if s not in live)

    def add(self, manifest: Manifest) -> None:
        """A manifest committed by this process: add it without rebuilding (rebuild if it replaces others)."""
        if manifest.segment in self.manifests:
            return  # a refresh on another thread picked it up between its commit and this call
        self.manifests[manifest.segment] = manifest
        latest = self.manifests[self.live[-1]].order_key if self.live else None
        if manifest.replaces or (latest is not None and manifest.order_key < latest):
            self._rebuild()
            return
        self.live.append(manifest.segment)
        self._add_entries(manifest)

    def remove(self, segment: str) -> None:
        self.manifests.pop(segment, None)
        self._rebuild()

    def _rebuild(self) -> None:
        rebuilt = Index.build(self.manifests, self.pending_erasure)
        self.live, self.locate, self.shadowed = rebuilt.live, rebuilt.locate, rebuilt.shadowed

    def live_positions(self, segment: str) -> list[int]:
        """Positions of a live segment whose IDs are not shadowed by a newer copy."""
        manifest = self.manifests[segment]
        return [p for p, i in enumerate(manifest.ids) if self.locate.get(i) == (segment, p)]

    def holding(self, wanted: set[ExampleId]) -> list[str]:
        """Live segments that hold any copy (the current one or a shadowed one) of an ID in `wanted`."""
        return [s for s in self.live if not wanted.isdisjoint(self.manifests[s].ids)]
