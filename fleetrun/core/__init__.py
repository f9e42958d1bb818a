"""fleetrun's core: the task lifecycle, executor, store, inventory and plugin manager."""
