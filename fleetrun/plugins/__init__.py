"""Built-in plugins, registered explicitly by the plugin manager."""
