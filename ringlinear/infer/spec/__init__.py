"""Speculative decoding: the configuration (vLLM's dict), the drafters (n-gram prompt lookup, the
checkpoint's MTP layers) and rejection sampling of draft trees. The kernels that verify a tree in
one target forward are `ops.lightning.lightning_tree_verify` and `ops.paged_attention`'s tree mask."""
