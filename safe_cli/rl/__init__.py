"""Budget policy (Stage B) and its distillation (Stage C)."""
