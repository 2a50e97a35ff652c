"""Files shipped inside artifacts (not imported by the toolkit)."""
