"""The core: registry, compute ledger, configs, errors and IO helpers. It imports nothing of the project."""
