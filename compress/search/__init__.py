"""Budget allocation across layers."""
