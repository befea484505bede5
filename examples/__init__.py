"""Examples that run inside rcm's workflow (each folder says how)."""
