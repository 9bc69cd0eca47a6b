"""Training stages (one recipe file each), their retention mechanisms, checkpoints and run layout."""
