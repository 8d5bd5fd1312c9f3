"""anyservice."""
