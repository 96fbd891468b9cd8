"""A rank that allocates until its memory runs out (for tests of the rank memory limit): 64 MiB at a time, up to
`argv[1]` MiB, touching every page so the memory is really used."""

from __future__ import annotations

import sys

chunks = []
for _ in range(int(sys.argv[1]) // 64):
    chunks.append(bytearray(64 << 20))
print(f"allocated {len(chunks) * 64} MiB", flush=True)
