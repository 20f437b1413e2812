"""Built-in methods; importing a module registers its method."""
