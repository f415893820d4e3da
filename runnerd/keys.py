"""Every Redis key and stream name runnerd uses, in one place.

The work is split into partitions. Each partition's keys share one hash tag, `{<prefix>-<n>}`,
so on Redis Cluster each partition lives in one slot (its Lua scripts may touch all of its keys)
while the partitions spread over the masters. An execution id starts with its partition
(`3-9f2c...`), so every key of an execution can be derived from its id alone.

Dependency bundles (runnerd/bundle_store.py) belong to no partition: each bundle has a hash tag
of its own, `{<prefix>-bundle-<id>}`, so that its manifest and all its chunks sit in one cluster
slot (written in one pipeline to one master, the manifest last) while different bundles spread
over the masters. A worker reads them with plain GETs, which any node redirects to that slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GROUP = "runnerd"


@dataclass(frozen=True)
class Keys:
    prefix: str
    partitions: int

    def tag(self, partition: int) -> str:
        return f"{{{self.prefix}-{partition}}}"

    def work(self, partition: int) -> str:
        """The stream of executions to run (consumer group GROUP)."""
        return f"{self.tag(partition)}:work"

    def delayed(self, partition: int) -> str:
        """Sorted set of executions waiting for a retry, scored by due time (ms)."""
        return f"{self.tag(partition)}:delayed"

    def dead(self, partition: int) -> str:
        """Dead-letter stream: entries that could not be run, with the reason."""
        return f"{self.tag(partition)}:dead"

    def workers(self) -> str:
        """Hash of the live workers (field: worker id, value: a msgpack WorkerInfo), under
        partition 0's tag so that it is one key on one cluster slot."""
        return f"{self.tag(0)}:workers"

    def integration(self, partition: int, digest: str) -> str:
        """An integration definition (code included), stored once by content hash."""
        return f"{self.tag(partition)}:integration:{digest}"

    def new_execution_id(self, partition: int) -> str:
        # 128 random bits, as uuid4 has (bar its 6 fixed ones), for a tenth of its cost.
        return f"{partition}-{os.urandom(16).hex()}"

    def partition_of(self, execution_id: str) -> int:
        head, sep, _ = execution_id.partition("-")
        if not sep or not head.isdigit() or int(head) >= self.partitions:
            raise ValueError(f"not an execution id of this deployment: {execution_id!r}")
        return int(head)

    def _execution(self, execution_id: str, kind: str) -> str:
        return f"{self.tag(self.partition_of(execution_id))}:{kind}:{execution_id}"

    def input(self, execution_id: str) -> str:
        """The execution's input payload (msgpack), kept out of the stream entry."""
        return self._execution(execution_id, "input")

    def checkpoint(self, execution_id: str) -> str:
        return self._execution(execution_id, "checkpoint")

    def result(self, execution_id: str) -> str:
        return self._execution(execution_id, "result")

    def submitted(self, execution_id: str) -> str:
        """Set by the submit that enqueued the execution: a second submit of the id is a no-op."""
        return self._execution(execution_id, "submitted")

    def completions(self, partition: int) -> str:
        """Stream of finished executions (field `c`: a msgpack Completion), trimmed to the
        last COMPLETIONS_KEEP_MS: each client's one reader resolves its waiters from it."""
        return f"{self.tag(partition)}:completions"

    def cancel(self, execution_id: str) -> str:
        """Set when an operator cancels the execution: workers stop it before its next step,
        and kill the step it is running."""
        return self._execution(execution_id, "cancel")

    def loop(self, execution_id: str) -> str:
        """Hash of the execution's loops' state: per loop step k, `k:total`, `k:done`,
        `k:failed`, and for a distributed loop `k:attempt`, `k:ended` (set once, by whoever
        enqueues the continuation) and `k:enqueued`; `current` names the running loop step."""
        return self._execution(execution_id, "loop")

    def loop_items(self, execution_id: str, step: int, chunk: int) -> str:
        """Hash of one chunk of a loop's items (LOOP_CHUNK of them): `r<i>` item i's
        ItemResult, `s<i>` the worker that started it; a distributed loop's `i<i>` its input.
        Chunked so that a loop of 10,000 large results is never one huge value."""
        return f"{self._execution(execution_id, 'items')}:{step}:{chunk}"

    def loops(self, partition: int) -> str:
        """Sorted set of the partition's running loops (`<execution id>:<step>`, scored by
        their start in ms), so that `runnerd status` can show their progress."""
        return f"{self.tag(partition)}:loops"

    def bundle_tag(self, bundle_id: str) -> str:
        return f"{{{self.prefix}-bundle-{bundle_id}}}"

    def bundle_manifest(self, bundle_id: str) -> str:
        """A stored bundle's msgpack BundleManifest (size, SHA-256, chunk count): written after
        its chunks, so a manifest present means a bundle complete."""
        return f"{self.bundle_tag(bundle_id)}:manifest"

    def bundle_chunk(self, bundle_id: str, sha256: str, index: int) -> str:
        """Chunk `index` of the bundle's archive (CHUNK_BYTES each, the last shorter), named by
        the archive's SHA-256 too: two builds racing to store different bytes under one id
        never mix their chunks, and the manifest that wins (SET NX) names its own."""
        return f"{self.bundle_tag(bundle_id)}:chunk:{sha256}:{index}"
