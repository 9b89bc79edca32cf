"""fedenc ClientApp: one partner site."""
