"""mpickpt's own protobuf descriptor pool.

The generated modules beside this file register `checkpoint.proto` and `node_strategy.proto` here
rather than in protobuf's default pool, where MindSpore registers files of the same names; so
mpickpt and mindspore can be imported into one process in either order.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
