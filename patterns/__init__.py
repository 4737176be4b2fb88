"""fxbt's built-in pattern library: one pattern family per module."""
