"""Test helpers shipped with mpickpt: hypothesis strategies for layouts and conversions (needs hypothesis)."""
