"""deploy: wires the packages into a running network (config, local network, CLI)."""
