"""mla-harness."""
