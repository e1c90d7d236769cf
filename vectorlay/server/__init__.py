"""The control plane: accepts node, proxy and CLI links, stores state, schedules, reconciles."""
