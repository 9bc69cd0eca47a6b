"""Built-in profiles (YAML), found by name anywhere below this folder."""
